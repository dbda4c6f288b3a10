"""The txtai API stack reproduced minimally: FastAPI with txtai's token ``Authorization``.

As ``txtai.api`` does: the SHA-256 hex digest of the token comes from ``TOKEN`` and is a
dependency of the whole application; the bearer credentials are hashed and compared with
``hmac.compare_digest``; ``POST /workflow`` is a sync ``def`` endpoint taking ``name`` and
``elements`` as body fields, so FastAPI runs it in its thread pool. The echo workflow gives
the elements back. Run with ``uvicorn txtai_app:app``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, List

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer


class Authorization:
    """Bearer token check against the SHA-256 hash of the valid token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, authorization: HTTPAuthorizationCredentials = Depends(HTTPBearer())) -> None:
        if not hmac.compare_digest(self.token, self.digest(authorization.credentials)):
            raise HTTPException(status_code=401, detail="Invalid Authorization Token")

    def digest(self, token: str) -> str:
        """SHA-256 hex digest of a token."""
        return hashlib.sha256(token.encode("utf-8")).hexdigest()


WORKFLOWS = {"echo": lambda elements: list(elements)}

router = APIRouter()


@router.post("/workflow")
def workflow(name: str = Body(...), elements: List[Any] = Body(...)) -> List[Any]:
    """Run the named workflow over the elements (a sync endpoint, as txtai's routers)."""
    if name not in WORKFLOWS:
        raise HTTPException(status_code=404, detail=f"no workflow named {name!r}")
    return WORKFLOWS[name](elements)


def create() -> FastAPI:
    """The application, with the token dependency when ``TOKEN`` is set (as txtai)."""
    token = os.environ.get("TOKEN")
    dependencies = [Depends(Authorization(token))] if token else None
    application = FastAPI(dependencies=dependencies)
    application.include_router(router)
    return application


app = create()
