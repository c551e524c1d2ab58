"""Offline OCR of scanned pages with RapidOCR (PaddleOCR's PP-OCRv4 models in ONNX).

The models (Chinese + English detection and recognition, 16 MB) ship inside the
`rapidocr-onnxruntime` wheel, so nothing is downloaded at run time. Recognised boxes are
grouped into lines by their vertical position and read left to right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SCORE = 0.5  # recognition confidence below which a box is dropped


class OcrUnavailable(RuntimeError):
    """The OCR engine could not be loaded (package missing or broken)."""


@dataclass
class _Box:
    top: float
    bottom: float
    left: float
    text: str


class PageReader:
    """Reads page images; the ONNX sessions are loaded on first use, once per process."""

    def __init__(self) -> None:
        self._engine: Any = None

    def _load(self) -> Any:
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise OcrUnavailable(str(exc)) from exc
            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
            self._engine = RapidOCR()
        return self._engine

    def read(self, image: np.ndarray) -> str:
        """The text of one page image (H x W x 3, uint8), one recognised line per line."""
        result, _ = self._load()(image)
        boxes = []
        for points, text, score in result or []:
            if float(score) < MIN_SCORE or not str(text).strip():
                continue
            ys = [p[1] for p in points]
            xs = [p[0] for p in points]
            boxes.append(_Box(min(ys), max(ys), min(xs), str(text).strip()))
        return "\n".join(" ".join(box.text for box in line) for line in _lines(boxes))


def _lines(boxes: list[_Box]) -> list[list[_Box]]:
    """Boxes whose vertical centres fall within one another's height form a line."""
    lines: list[list[_Box]] = []
    for box in sorted(boxes, key=lambda b: (b.top + b.bottom) / 2):
        centre = (box.top + box.bottom) / 2
        if lines:
            last = lines[-1]
            top = min(b.top for b in last)
            bottom = max(b.bottom for b in last)
            if top <= centre <= bottom:
                last.append(box)
                continue
        lines.append([box])
    return [sorted(line, key=lambda b: b.left) for line in lines]
