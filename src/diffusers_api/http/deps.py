"""What routes receive from the app, as FastAPI dependencies: the services the app was built with, and auth.

The app factory (app.py) puts one `Services` on `app.state`; routes never read `app.state` themselves, they
declare what they need (`engine: EngineDep`), so a route's signature says what it touches.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..engine import Engine
from ..errors import Unauthorized
from ..events import EventHub
from ..generation import InFlight
from ..jobs import JobStore
from ..metrics import Metrics


@dataclass(frozen=True)
class Services:
    """Everything the routes use, made once per app by `create_app`."""

    settings: Settings
    engine: Engine
    events: EventHub
    jobs: JobStore
    metrics: Metrics
    in_flight: InFlight = field(default_factory=InFlight)  # requests answered outside jobs, for the drain


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


def _settings(services: ServicesDep) -> Settings:
    return services.settings


def _engine(services: ServicesDep) -> Engine:
    return services.engine


def _events(services: ServicesDep) -> EventHub:
    return services.events


def _jobs(services: ServicesDep) -> JobStore:
    return services.jobs


def _metrics(services: ServicesDep) -> Metrics:
    return services.metrics


def _in_flight(services: ServicesDep) -> InFlight:
    return services.in_flight


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
EventsDep = Annotated[EventHub, Depends(_events)]
JobsDep = Annotated[JobStore, Depends(_jobs)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
InFlightDep = Annotated[InFlight, Depends(_in_flight)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """The bearer token must match API_KEY when one is set."""
    check_api_key(request, settings)


def check_api_key(request: Request, settings: Settings) -> None:
    expected = settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected.get_secret_value()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")
