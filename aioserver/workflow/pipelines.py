"""Built-in pipelines that need no machine-learning model: textractor, segmentation, summary.

Configured like txtai's, by a top-level section named after them::

    textractor: {paragraphs: true, minlength: 40}
    summary: {sentences: 3}

Abstractive models (txtai's ``Summary`` or ``Translation`` pipelines) plug in the same way,
as dotted-path sections (``txtai.pipeline.Translation: {}``) when txtai is installed.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from bs4 import BeautifulSoup

from ..errors import InvalidElement
from .safeopen import fetch, is_path, is_url

if TYPE_CHECKING:
    from .runtime import Runtime

# A sentence ends at . ! or ? (and closing quotes/brackets) followed by space and a capital,
# a digit or an opening quote: good enough for prose without a language model.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]’”]*\s+(?=[\"'(\[‘“]?[A-Z0-9À-Ý])")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
# Words too common to say what a sentence is about (English; others still rank by frequency).
STOPWORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her "
    "here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not "
    "now of off on once only or other our ours ourselves out over own same she should so some such than that the "
    "their theirs them themselves then there these they this those through to too under until up very was we "
    "were what when where which while who whom why will with would you your yours yourself yourselves".split()
)
# Elements holding no text of the page: scripts, styles and navigation boilerplate.
BOILERPLATE = ("script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form", "iframe")
BLOCKS = (
    "p",
    "div",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "td",
    "th",
    "dd",
    "dt",
    "section",
    "article",
    "main",
    "br",
    "tr",
    "figcaption",
    "caption",
    "title",
)


def _texts(name: str, batch: list[Any]) -> list[str]:
    for element in batch:
        if not isinstance(element, str):
            raise InvalidElement(f"{name} takes strings, got {type(element).__name__}")
    return batch


class Segmentation:
    """Splits text into sentences, lines or paragraphs; cleans white space; drops short pieces.

    With none of ``sentences``, ``lines``, ``paragraphs`` the text is only cleaned, paragraph by
    paragraph. ``join``
    puts the pieces back into one string (paragraphs by a blank line, lines by a newline,
    sentences by a space).
    """

    def __init__(
        self,
        sentences: bool = False,
        lines: bool = False,
        paragraphs: bool = False,
        minlength: int | None = None,
        join: bool = False,
        cleantext: bool = True,
    ) -> None:
        if sum((sentences, lines, paragraphs)) > 1:
            raise ValueError("choose one of sentences, lines, paragraphs")
        if minlength is not None and (isinstance(minlength, bool) or not isinstance(minlength, int) or minlength < 0):
            raise ValueError(f"minlength must be a non-negative integer, got {minlength!r}")
        self.sentences, self.lines, self.paragraphs = sentences, lines, paragraphs
        self.minlength, self.join, self.cleantext = minlength, join, cleantext

    def __call__(self, batch: list[Any]) -> list[Any]:
        return [self.segment(text) for text in _texts(type(self).__name__.lower(), batch)]

    def segment(self, text: str) -> str | list[str]:
        """The text cleaned and split as configured."""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.sentences:
            pieces = [s for p in re.split(r"\n\s*\n", text) for s in _SENTENCE_END.split(self.clean(p))]
            glue = " "
        elif self.lines:
            pieces, glue = text.split("\n"), "\n"
        else:  # paragraphs; or, with no split asked for, paragraphs cleaned one by one and joined
            pieces, glue = re.split(r"\n\s*\n", text), "\n\n"
        pieces = [self.clean(piece) for piece in pieces]
        pieces = [piece for piece in pieces if piece and len(piece) >= (self.minlength or 0)]
        if self.join or not (self.sentences or self.lines or self.paragraphs):
            return glue.join(pieces)
        return pieces

    def clean(self, text: str) -> str:
        """Runs of white space made one space, ends stripped (when ``cleantext``)."""
        return re.sub(r"\s+", " ", text).strip() if self.cleantext else text


class Textractor(Segmentation):
    """Text from HTML: a URL (fetched through safeopen), a file under safeopen.directory, or HTML.

    Navigation, scripts, styles and other boilerplate are dropped; block elements become
    paragraphs, so ``paragraphs``, ``sentences``, ``lines``, ``minlength`` and ``join`` work
    as in :class:`Segmentation`.
    """

    wants_runtime = True

    async def __call__(self, batch: list[Any], runtime: Runtime | None = None) -> list[Any]:  # type: ignore[override]
        documents = await asyncio.gather(*(self._read(element, runtime) for element in _texts("textractor", batch)))
        # Parsing is CPU work: off the event loop.
        return await asyncio.to_thread(lambda: [self.segment(html_to_text(html)) for html in documents])

    async def _read(self, element: str, runtime: Runtime | None) -> str:
        if not (is_url(element) or is_path(element)):
            return element
        if runtime is None:
            raise RuntimeError("textractor needs the server's runtime to open URLs and files")
        if is_url(element):
            body, _ = await fetch(runtime.session, runtime.safeopen, element, who="textractor")
        else:
            path = runtime.safeopen.check_file(element)
            body = await asyncio.to_thread(path.read_bytes)
        return body.decode("utf-8", errors="replace")


def html_to_text(html: str) -> str:
    """The readable text of an HTML document: one paragraph per block, boilerplate dropped."""
    # html.parser: pure Python, no build step; BeautifulSoup adds the tree and the repair of
    # unclosed tags that the standard library's tokenizer alone does not do.
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(BOILERPLATE):
        tag.decompose()
    for tag in soup.find_all(BLOCKS):
        # Blank lines around blocks, so that segmentation sees one paragraph per block.
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    text = soup.get_text()
    paragraphs = (re.sub(r"[ \t\f\v]*\n[ \t\f\v]*", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


class Summary:
    """Extractive summary: sentences ranked by the frequency of their words, best kept in order.

    ``sentences`` is how many to keep (default 3); ``maxlength`` caps the summary's words.
    Either may also be given per task in ``args``.
    """

    def __init__(self, sentences: int = 3, maxlength: int | None = None) -> None:
        self.sentences, self.maxlength = (
            _positive(sentences, "sentences"),
            maxlength and _positive(maxlength, "maxlength"),
        )

    def __call__(self, batch: list[Any], sentences: int | None = None, maxlength: int | None = None) -> list[str]:
        count = sentences or self.sentences
        limit = maxlength or self.maxlength
        return [summarize(text, count, limit) for text in _texts("summary", batch)]


def summarize(text: str, count: int, maxlength: int | None = None) -> str:
    """The ``count`` best sentences of ``text``, in their original order, within ``maxlength`` words."""
    # A paragraph break ends a sentence too (a heading has no full stop).
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    sentences = [s for p in paragraphs for s in _SENTENCE_END.split(p) if s]
    words = [[w.lower() for w in _WORD.findall(s)] for s in sentences]
    frequency = Counter(w for ws in words for w in ws if w not in STOPWORDS)
    top = max(frequency.values(), default=1)

    def score(i: int) -> float:
        content = [w for w in words[i] if w not in STOPWORDS]
        # Mean weight, damped by length so that long sentences do not win by size alone.
        return sum(frequency[w] / top for w in content) / math.sqrt(len(words[i]) or 1)

    ranked = sorted(range(len(sentences)), key=lambda i: (-score(i), i))[:count]
    chosen = sorted(ranked)
    if maxlength is not None:
        # Drop the lowest ranked sentences until the summary fits; cut the last one if need be.
        while len(chosen) > 1 and sum(len(sentences[i].split()) for i in chosen) > maxlength:
            chosen.remove(max(chosen, key=lambda i: (-score(i), i)))
        summary = " ".join(sentences[i] for i in chosen).split()
        return " ".join(summary[:maxlength])
    return " ".join(sentences[i] for i in chosen)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
