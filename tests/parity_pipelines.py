"""txtai's API with stand-ins for the pipelines its oracle venv cannot run (tests/txtaioracle.py).

txtai's ``summary`` needs a model (torch, transformers) and its ``textractor`` BeautifulSoup
(its ``pipeline`` extra), which the oracle's venv lacks: with their sections, txtai's API would
not start. Given as ``API_CLASS=parity_pipelines.ShapeAPI``, this API creates every other
pipeline as txtai does and stands in for those two with classes that keep txtai's contract
for the shape of an answer (a string for a string, a list for a list; a textractor's pieces
split as its section says), so that txtai's own routes (its routers, its request validation,
its argument passing) answer requests whose shapes the parity tests compare with aioserver's.
The values are not txtai's: those need its models.
"""

from __future__ import annotations

from typing import Any

from txtai.api import API
from txtai.pipeline import Segmentation


class Textractor(Segmentation):  # type: ignore[misc]
    """txtai's Textractor without its HTML-to-Markdown step: the input is taken as its text,
    then split and cleaned by txtai's own Segmentation rules, as txtai's Textractor does."""

    def __init__(self, safeopen: bool = False, headers: Any = None, backend: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class Summary:
    """txtai's Summary's contract: a string for a string, a list for a list; lengths are integers."""

    def __call__(self, text: Any, minlength: int | None = None, maxlength: int | None = None) -> Any:
        for length in (minlength, maxlength):
            if length is not None and not isinstance(length, int):
                raise TypeError(f"a length must be an integer, got {length!r}")
        texts = text if isinstance(text, list) else [text]
        summaries = [value[: maxlength or None] for value in texts]
        return summaries if isinstance(text, list) else summaries[0]


class ShapeAPI(API):  # type: ignore[misc]
    """txtai's API, its summary and textractor pipelines replaced by the stand-ins above."""

    STANDINS = {"textractor": Textractor, "summary": Summary}

    def createpipelines(self) -> None:
        sections = {name: self.config.pop(name) for name in self.STANDINS if name in self.config}
        try:
            super().createpipelines()
        finally:
            self.config.update(sections)  # txtai adds a pipeline's routes when its section is there
        for name, section in sections.items():
            self.pipelines[name] = self.STANDINS[name](**(section or {}))
