"""HTML pages: the main content (trafilatura), else every visible word (stdlib parser).

trafilatura drops navigation, cookie banners, footers and scripts, and writes headings, lists,
tables and `<pre>` code (indentation kept) as Markdown. When it finds no main content (a short
page, a bare fragment: under MIN_MAIN_CHARS), the whole visible text is kept instead, `<pre>`
blocks verbatim.
Neither fetches anything nor runs scripts.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "tr",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "dd",
    "dt",
    "hr",
    "main",
    "nav",
    "aside",
    "figure",
    "figcaption",
    "form",
    "title",
}
_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}


# Below this many characters trafilatura has found no article and falls back to a baseline that
# puts every inline element on its own line: the stdlib extractor reads such pages better.
MIN_MAIN_CHARS = 250


def main_content(html: str) -> str | None:
    """The page's main content as Markdown, or None when trafilatura finds none."""
    import trafilatura

    text = trafilatura.extract(
        html,
        output_format="markdown",
        include_formatting=True,
        include_tables=True,
        include_links=False,
        include_images=False,
        include_comments=False,
        favor_recall=True,
        with_metadata=False,
    )
    return text if text and len(text.strip()) >= MIN_MAIN_CHARS else None


class _TextExtractor(HTMLParser):
    """Keeps visible text; drops scripts, styles and markup; `<pre>` content verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag == "pre":
            self.pre_depth += 1
            self.parts.append("\n\x02")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
            self.parts.append("\x03\n")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            # Inside <pre>, newlines are the code's own: protect them from the clean-up.
            self.parts.append(data.replace("\n", "\x01") if self.pre_depth else data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page; `<pre>` blocks keep their line breaks and indentation."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    out = []
    for chunk in re.split(r"(\x02.*?\x03)", text, flags=re.S):
        if chunk.startswith("\x02"):
            out.append("\n" + chunk.strip("\x02\x03").strip("\x01").replace("\x01", "\n") + "\n")
        else:
            lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in chunk.split("\n")]
            out.append("\n".join(lines))
    text = (
        "".join(out).replace("\x01", "\n").replace("\x02", "").replace("\x03", "")
    )  # unclosed <pre>
    return re.sub(r"\n{3,}", "\n\n", text).strip()
