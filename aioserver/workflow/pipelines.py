"""Built-in pipelines that need no machine-learning model: textractor, segmentation, summary.

Configured like txtai's, by a top-level section named after them::

    textractor: {paragraphs: true, minlength: 40}
    summary: {sentences: 3}

Abstractive models (txtai's ``Summary`` or ``Translation`` pipelines) plug in the same way,
as dotted-path sections (``txtai.pipeline.Translation: {}``) when txtai is installed.

Their input is untrusted, so every step is linear in it: no regular expression here can
backtrack over a run it has already scanned (possessive quantifiers, or patterns checked
against megabytes of their worst case in the tests), and HTML is read by a single pass of
our own tokenizer, not a tree. With a server, the CPU work runs in the runtime's worker
processes, which are killed when the request is cancelled (a 504, a client gone, shutdown).
"""

from __future__ import annotations

import asyncio
import html as htmllib
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidElement
from .safeopen import fetch, is_path, is_url

if TYPE_CHECKING:
    from .runtime import Runtime

T = TypeVar("T")

# A sentence ends at . ! or ? (and closing quotes/brackets) followed by space and a capital,
# a digit or an opening quote: good enough for prose without a language model. Linear: only a
# position right after . ! or ? can start a match, and the run it scans ends at the next one.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]’”]*\s+(?=[\"'(\[‘“]?[A-Z0-9À-Ý])")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
# A blank line: \s* may run to the next newline and back, but no further, so this is linear.
_BLANK_LINE = re.compile(r"\n\s*\n")
_SPACES = re.compile(r"\s+")
# txtai's Segmentation's: spaces only (line breaks and tabs stay), and its splits.
_SPACE_RUNS = re.compile(r" +")
_LINE_BREAKS = re.compile(r"(?:\r?\n)+")
_PARAGRAPH_BREAKS = re.compile(r"(?:\r?\n){2,}")
_SECTION_BREAKS = re.compile(r"(?:\r?\n){3,}")
_FORM_FEED = re.compile(r"\f")
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
BOILERPLATE = frozenset(
    {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form", "iframe"}
)
BLOCKS = frozenset(
    {
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
    }
)


def _texts(name: str, batch: list[Any]) -> list[str]:
    for element in batch:
        if not isinstance(element, str):
            raise InvalidElement(f"{name} takes strings, got {type(element).__name__}")
    return batch


async def _compute(runtime: Runtime | None, function: Callable[..., T], *args: Any) -> T:
    """CPU work: in the runtime's worker processes, or here when there is no server (library use)."""
    if runtime is None:
        return function(*args)
    return await runtime.processes.run(function, *args)


class Segmentation:
    """Splits text into sentences, lines, paragraphs or sections, and cleans it, by txtai's rules.

    ``lines`` splits at runs of line breaks, ``paragraphs`` at two or more, ``sections`` at form
    feeds (or, without any, at three or more line breaks); ``sentences`` at sentence ends (and
    blank lines) by a rule of ours, where txtai asks NLTK. With none of them the text is only
    cleaned. Cleaning (``cleantext``, on by default) makes runs of spaces one and strips each
    piece's ends (line breaks inside a piece stay, as in txtai); then a piece shorter than
    ``minlength`` characters is dropped (without a split, the result is None). Empty pieces
    are dropped; ``join`` puts the rest back into one string, separated by spaces.
    """

    wants_runtime = True

    def __init__(
        self,
        sentences: bool = False,
        lines: bool = False,
        paragraphs: bool = False,
        minlength: int | None = None,
        join: bool = False,
        sections: bool = False,
        cleantext: bool = True,
    ) -> None:
        if sum((sentences, lines, paragraphs, sections)) > 1:
            raise ValueError("choose one of sentences, lines, paragraphs, sections")
        if minlength is not None and (isinstance(minlength, bool) or not isinstance(minlength, int) or minlength < 0):
            raise ValueError(f"minlength must be a non-negative integer, got {minlength!r}")
        self.sentences, self.lines, self.paragraphs, self.sections = sentences, lines, paragraphs, sections
        self.minlength, self.join, self.cleantext = minlength, join, cleantext

    @property
    def splits(self) -> bool:
        """Whether a text becomes a list of pieces (else one string, or None)."""
        return (self.sentences or self.lines or self.paragraphs or self.sections) and not self.join

    async def __call__(self, batch: list[Any], *, runtime: Runtime | None = None) -> list[Any]:
        return await _compute(runtime, self.segment_all, _texts(type(self).__name__.lower(), batch))

    def segment_all(self, texts: list[str]) -> list[str | list[str] | None]:
        """Each text segmented (the part of a call that runs in a worker process)."""
        return [self.segment(text) for text in texts]

    def segment(self, text: str) -> str | list[str] | None:
        """The text split and cleaned as configured."""
        if self.sentences:
            pieces = [self.clean(s) for p in _BLANK_LINE.split(text) for s in _SENTENCE_END.split(p)]
        elif self.lines:
            pieces = [self.clean(line) for line in _LINE_BREAKS.split(text)]
        elif self.paragraphs:
            pieces = [self.clean(paragraph) for paragraph in _PARAGRAPH_BREAKS.split(text)]
        elif self.sections:
            pattern = _FORM_FEED if "\f" in text else _SECTION_BREAKS
            pieces = [self.clean(section) for section in pattern.split(text)]
        else:
            return self.clean(text)
        kept = [piece for piece in pieces if piece]
        return " ".join(kept) if self.join else kept

    def clean(self, text: str) -> str | None:
        """Runs of spaces made one, ends stripped; None when shorter than ``minlength`` (when ``cleantext``)."""
        if not self.cleantext:
            return text
        text = _SPACE_RUNS.sub(" ", text).strip()
        return text if not self.minlength or len(text) >= self.minlength else None


class Textractor(Segmentation):
    """Text from HTML: a URL (fetched through safeopen), a file under safeopen.directory, or HTML.

    Navigation, scripts, styles and other boilerplate are dropped; block elements become
    paragraphs, so ``paragraphs``, ``sentences``, ``lines``, ``minlength`` and ``join`` work
    as in :class:`Segmentation`.
    """

    async def __call__(self, batch: list[Any], *, runtime: Runtime | None = None) -> list[Any]:
        documents = await asyncio.gather(*(self._read(element, runtime) for element in _texts("textractor", batch)))
        return await _compute(runtime, self.extract_all, documents)

    def extract_all(self, documents: list[str]) -> list[str | list[str] | None]:
        """Each document's text, segmented (the part of a call that runs in a worker process)."""
        return [self.segment(html_to_text(document)) for document in documents]

    async def _read(self, element: str, runtime: Runtime | None) -> str:
        if not (is_url(element) or is_path(element)):
            return element
        if runtime is None:
            raise RuntimeError("textractor needs the server's runtime to open URLs and files")
        if is_url(element):
            body, _ = await fetch(runtime.session, runtime.safeopen, element, who="textractor")
        else:
            # The runtime's threads, not asyncio's default executor, which the server keeps free;
            # checking the path stats the file system too.
            path = await runtime.to_thread(runtime.safeopen.check_file, element)
            body = await runtime.to_thread(path.read_bytes)
        return body.decode("utf-8", errors="replace")


# -- HTML to text, in one pass.
#
# A tokenizer after HTML's (https://html.spec.whatwg.org/multipage/parsing.html#tokenization),
# as far as text needs it: text, tags, comments, raw text (scripts, styles) and entities. The
# tree is reduced to a stack of open elements, to know when a boilerplate element ends. The
# standard library's html.parser rescans an unclosed construct from every '<' that follows
# it (quadratic), and libxml2 or lexbor compare each attribute of a tag with all the others
# before it (quadratic too); here each pattern is possessive, an unclosed construct runs to
# the end of the input as the standard says, and attributes are skipped, never stored.

_TAG_OPEN = re.compile(r"<(/?)([A-Za-z][^\t\n\f\r />]*+)")
# The rest of a tag after its name: attributes (a quoted value may hold '>'), then '>' or
# '/>'; or the end of the input, where the standard drops the unfinished tag.
_TAG_REST = re.compile(
    r"(?:[\t\n\f\r ]++|/(?!>)|[^\t\n\f\r />][^\t\n\f\r />=]*+"
    r"(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?:\"[^\"]*+(?:\"|\Z)|'[^']*+(?:'|\Z)|[^\t\n\f\r >]*+))?+)*+(/?>|\Z)"
)
# '<' that opens nothing (not followed by a letter, '!', '?' or '/') is text, as is what follows.
_LITERAL = re.compile(r"(?:<(?![A-Za-z!?/])[^<]*+)++")
_COMMENT_END = re.compile(r"--!?>")
_DECIMAL_REFERENCE = re.compile(r"&#([0-9]{8,}+)")
VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)
# Elements whose content is text up to their end tag, not markup; the first three are shown.
_RAW_SHOWN = {"title": True, "textarea": True, "xmp": False}  # name: whether entities count
_RAW = {**_RAW_SHOWN, **dict.fromkeys(("script", "style", "noscript", "iframe", "noembed", "noframes"), False)}
_RAW_END = {name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE | re.ASCII) for name in _RAW}
_FOREIGN = frozenset({"svg", "math"})  # SVG and MathML: no raw text inside, CDATA sections
_BREAK = "\n\n"


def html_to_text(html: str) -> str:
    """The readable text of an HTML document: one paragraph per block, boilerplate dropped."""
    return _paragraphs("".join(_text_pieces(html.replace("\r\n", "\n").replace("\r", "\n"))))


def _paragraphs(text: str) -> str:
    """Blank lines separate paragraphs; inside one, line breaks and the spaces around them are a space."""
    paragraphs = (" ".join(line.strip(" \t\f\v") for line in p.split("\n")).strip() for p in _BLANK_LINE.split(text))
    return "\n\n".join(p for p in paragraphs if p)


def _text_pieces(html: str) -> list[str]:  # noqa: C901 - one state machine reads best in one place
    """The text of ``html`` and paragraph breaks, in order, without boilerplate."""
    pieces: list[str] = []
    stack: list[str] = []  # open elements (not void, not self-closed)
    open_counts: dict[str, int] = {}
    hidden = 0  # boilerplate elements open: their text is dropped
    foreign = 0  # svg or math elements open
    end = len(html)
    i = 0
    while i < end:
        lt = html.find("<", i)
        if lt < 0:
            lt = end
        if lt > i:
            if not hidden:
                pieces.append(_unescape(html[i:lt]))
            i = lt
            continue
        # html[i] == "<"
        tag = _TAG_OPEN.match(html, i)
        if tag is None:
            literal = _LITERAL.match(html, i)
            if literal is not None:
                if not hidden:
                    pieces.append(_unescape(literal[0]))
                i = literal.end()
                continue
            i = _skip_markup(html, i, foreign > 0, pieces, hidden > 0)
            continue
        closing, name = tag[1], tag[2].lower()
        rest = _TAG_REST.match(html, tag.end())
        assert rest is not None  # the pattern matches the empty string at the end
        i = rest.end()
        if not rest[1]:  # the input ended inside the tag
            break
        if closing:
            if open_counts.get(name):
                while True:  # pop up to the element this closes, as parsers do for misnested tags
                    top = stack.pop()
                    open_counts[top] -= 1
                    hidden -= top in BOILERPLATE
                    foreign -= top in _FOREIGN
                    if top == name:
                        break
            if name in BLOCKS and not hidden:
                pieces.append(_BREAK)
            continue
        if name in BLOCKS and not hidden:
            pieces.append(_BREAK)
        if name in _RAW and not foreign:
            # Its content is text up to its end tag (or the end), which the loop then reads.
            found = _RAW_END[name].search(html, i)
            stop = found.start() if found else end
            if name in _RAW_SHOWN and not hidden:
                content = html[i:stop]
                pieces.append(_unescape(content) if _RAW_SHOWN[name] else content)
            i = stop
        elif name == "plaintext" and not foreign:
            if not hidden:
                pieces.append(html[i:])
            break
        elif name not in VOID and not rest[1].startswith("/"):
            stack.append(name)
            open_counts[name] = open_counts.get(name, 0) + 1
            hidden += name in BOILERPLATE
            foreign += name in _FOREIGN
    return pieces


def _skip_markup(html: str, i: int, foreign: bool, pieces: list[str], hidden: bool) -> int:
    """Past a comment, a doctype, a CDATA section or a bogus comment (``<?...>``, ``</3>``)."""
    if html.startswith("<!--", i):
        if html.startswith(">", i + 4):  # <!--> and <!---> are whole (empty) comments
            return i + 5
        if html.startswith("->", i + 4):
            return i + 6
        found = _COMMENT_END.search(html, i + 4)
        return found.end() if found else len(html)
    if foreign and html.startswith("<![CDATA[", i):  # in SVG or MathML: text
        stop = html.find("]]>", i + 9)
        stop = len(html) if stop < 0 else stop
        if not hidden:
            pieces.append(html[i + 9 : stop])
        return stop + 3
    if html.startswith("</>", i):
        return i + 3
    if html.startswith(("<!", "<?"), i) or html.startswith("</", i) and len(html) > i + 2:
        stop = html.find(">", i + 2)  # a bogus comment, up to '>'
        return len(html) if stop < 0 else stop + 1
    if not hidden:  # '</' at the very end is text
        pieces.append("</")
    return i + 2


def _unescape(text: str) -> str:
    """Character references decoded; a decimal one too long for int() is U+FFFD, as the standard says."""
    if "&" not in text:
        return text
    return htmllib.unescape(_DECIMAL_REFERENCE.sub(_short_decimal, text))


def _short_decimal(reference: re.Match[str]) -> str:
    # Python refuses to convert more than 4300 digits; any number of 8 digits is past U+10FFFF.
    digits = reference[1].lstrip("0") or "0"
    return "&#" + (digits if len(digits) < 8 else "1114112")


class Summary:
    """Extractive summary: sentences ranked by the frequency of their words, best kept in order.

    ``sentences`` is how many to keep (default 3). ``minlength`` and ``maxlength`` are txtai's:
    the least and the most tokens the summary may have (sentences are added, in rank order,
    until it has ``minlength``; the lowest ranked dropped, then the last cut, until it has at
    most ``maxlength``). A token is a word, a number or a punctuation mark (see
    :func:`count_tokens`): a model's subword tokenizer would count somewhat more. Both may also
    be given per task in ``args``, ``[minlength, maxlength]`` as in txtai, or as keywords.
    """

    wants_runtime = True

    def __init__(self, sentences: int = 3, minlength: int | None = None, maxlength: int | None = None) -> None:
        self.check_arguments(minlength, maxlength)
        self.sentences = _positive(sentences, "sentences")
        self.minlength, self.maxlength = minlength or None, maxlength or None

    @staticmethod
    def check_arguments(minlength: Any = None, maxlength: Any = None) -> None:
        """ValueError unless each length is None or a number of tokens (0, as in txtai, is none)."""
        for name, value in (("minlength", minlength), ("maxlength", maxlength)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a number of tokens (an integer, 0 or more), got {value!r}")

    async def __call__(
        self,
        batch: list[Any],
        minlength: int | None = None,
        maxlength: int | None = None,
        *,
        runtime: Runtime | None = None,
    ) -> list[str]:
        self.check_arguments(minlength, maxlength)
        texts = _texts("summary", batch)
        return await _compute(
            runtime,
            summarize_all,
            texts,
            self.sentences,
            minlength or self.minlength,
            maxlength or self.maxlength,
        )


def summarize_all(
    texts: list[str], count: int, minlength: int | None = None, maxlength: int | None = None
) -> list[str]:
    """:func:`summarize` for each text (the part of a call that runs in a worker process)."""
    return [summarize(text, count, minlength, maxlength) for text in texts]


# A token: a run of letters, digits or underscores, or one other visible character.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """The tokens of ``text``: its words and numbers, and each punctuation mark."""
    return sum(1 for _ in _TOKEN.finditer(text))


def summarize(text: str, count: int, minlength: int | None = None, maxlength: int | None = None) -> str:
    """The ``count`` best sentences of ``text`` in their order, with ``minlength`` to ``maxlength`` tokens."""
    # A paragraph break ends a sentence too (a heading has no full stop).
    paragraphs = (_SPACES.sub(" ", p).strip() for p in _BLANK_LINE.split(text))
    sentences = [s for p in paragraphs for s in _SENTENCE_END.split(p) if s]
    words = [[w.lower() for w in _WORD.findall(s)] for s in sentences]
    frequency = Counter(w for ws in words for w in ws if w not in STOPWORDS)
    top = max(frequency.values(), default=1)
    # Mean weight, damped by length so that long sentences do not win by size alone.
    scores = [sum(frequency[w] / top for w in ws if w not in STOPWORDS) / math.sqrt(len(ws) or 1) for ws in words]
    ranked = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))
    chosen = ranked[:count]
    tokens = {i: count_tokens(sentences[i]) for i in chosen}
    total = sum(tokens.values())  # kept as sentences come and go: linear however many do
    if maxlength is not None and minlength is not None:
        minlength = min(minlength, maxlength)  # as txtai: the most wins
    if minlength is not None:
        # The next best sentences join until the summary is long enough (or the text runs out).
        for i in ranked[count:]:
            if total >= minlength:
                break
            chosen.append(i)
            tokens[i] = count_tokens(sentences[i])
            total += tokens[i]
    if maxlength is not None:
        # Drop the lowest ranked sentences until the summary fits, never below minlength; then
        # cut it at maxlength if need be.
        least = minlength or 0
        while len(chosen) > 1 and total > maxlength and total - tokens[chosen[-1]] >= least:
            total -= tokens.pop(chosen.pop())
    summary = " ".join(sentences[i] for i in sorted(chosen))
    return _first_tokens(summary, maxlength) if maxlength is not None else summary


def _first_tokens(text: str, limit: int) -> str:
    """``text`` up to the end of its ``limit``-th token."""
    end = 0
    for number, token in enumerate(_TOKEN.finditer(text), start=1):
        if number > limit:
            break
        end = token.end()
    return text[:end]


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
