"""The API's routes, one router per area, in the order the OpenAPI document lists them."""

from fastapi import APIRouter

from cace_server.http.routes import calculate, health, ipi, jobs, models, updates

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    models.router,
    updates.router,
    calculate.router,
    jobs.router,
    ipi.router,
)

__all__ = ["ROUTERS"]
