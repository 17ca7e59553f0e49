"""ControlNet and T2I-Adapter residuals at the rendezvous (denoising/forward.py `Residuals`): taken from a UNet
call, joined across the parts of a merged forward with zeros for the rows of parts without, and passed on."""

from __future__ import annotations

import torch

from diffusers_api.denoising.forward import Residuals, StepBatch, StepRows


def rows(count: int, residuals: Residuals | None = None) -> StepRows:
    sample, hidden = torch.rand(count, 4, 8, 8), torch.rand(count, 7, 16)
    return StepRows(sample, torch.full((count,), 10.0), hidden, None, None, residuals)


def controlnet(count: int) -> Residuals:
    return Residuals(down=(torch.rand(count, 8, 8, 8), torch.rand(count, 16, 4, 4)), mid=torch.rand(count, 16, 4, 4))


def adapter(count: int) -> Residuals:
    return Residuals(intrablock=(torch.rand(count, 8, 4, 4), torch.rand(count, 16, 4, 4)))


def test_of_call_reads_the_unet_arguments() -> None:
    net = controlnet(2)
    named = {"down_block_additional_residuals": net.down, "mid_block_additional_residual": net.mid}
    read = Residuals.of_call(named)
    assert read is not None
    assert read.mid is net.mid
    assert read.intrablock == ()
    assert Residuals.of_call({"encoder_hidden_states": 1}) is None
    older = Residuals.of_call({"down_block_additional_residuals": adapter(2).intrablock})  # the deprecated spelling
    assert older is not None
    assert older.mid is None
    assert len(older.intrablock) == 2


def test_parts_without_residuals_get_zeros_on_their_rows() -> None:
    net, extra = controlnet(2), adapter(1)
    whole = StepRows.cat([rows(3), rows(2, net), rows(1, extra)])
    assert whole.residuals is not None
    assert whole.residuals.mid is not None
    assert [tuple(d.shape) for d in whole.residuals.down] == [(6, 8, 8, 8), (6, 16, 4, 4)]
    for joined, own in zip((*whole.residuals.down, whole.residuals.mid), (*net.down, net.mid), strict=True):
        assert torch.equal(joined[3:5], own)
        assert not joined[:3].any()
        assert not joined[5:].any()
    for joined, own in zip(whole.residuals.intrablock, extra.intrablock, strict=True):
        assert torch.equal(joined[5:], own)
        assert not joined[:5].any()
    assert StepRows.cat([rows(1), rows(2)]).residuals is None


def test_a_batch_with_residuals_passes_them_to_the_unet_eagerly() -> None:
    seen: dict[str, object] = {}

    def unet(sample: torch.Tensor, t: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor]:
        seen.update(kwargs)
        return (sample * 2,)

    def graph_forward(*args: object) -> None:
        raise AssertionError("a forward with residuals runs eagerly")

    outputs = StepBatch.of([rows(1), rows(2, adapter(2))]).run(graph_forward, unet)
    assert [int(out.shape[0]) for out in outputs] == [1, 2]
    assert isinstance(seen["down_intrablock_additional_residuals"], list)  # a new list: the UNet pops from it
    assert "mid_block_additional_residual" not in seen
