"""Small, fast PNG charts (bars, grouped bars, histograms) drawn with Pillow.

The dataset card is written by every build, including quick re-runs; matplotlib would spend a
second or two importing and rasterising four figures, more than tokenizing a few hundred files.
These charts cost milliseconds. Pictures that are looked at once and need more (piano rolls,
curves) use matplotlib in ``musefm.viz``.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
PALETTE = [(68, 119, 170), (238, 119, 51), (0, 119, 187), (34, 136, 51), (170, 51, 119), (204, 187, 68)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(maximum: float, ticks: int = 5) -> float:
    if maximum <= 0:
        return 1.0
    raw = maximum / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _format(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:.2g}"


class Chart:
    """One panel: a title, a plot area with a value axis, and drawing helpers."""

    def __init__(self, width: int, height: int, title: str, left: int = 50, bottom: int = 40):
        self.image = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small, self.big = _font(12), _font(10), _font(14)
        self.left, self.top, self.right, self.bottom = left, 30, width - 15, height - bottom
        self.draw.text((width // 2, 8), title, fill=INK, font=self.big, anchor="mt")

    def text_width(self, text: str, font=None) -> int:
        return int(self.draw.textlength(text, font=font or self.small))

    def value_axis(self, maximum: float, horizontal: bool) -> float:
        """Grid lines and labels for values 0..maximum; returns the axis top value."""
        step = _nice_step(maximum)
        top = step * max(1, math.ceil(maximum / step))
        value = 0.0
        while value <= top + 1e-9:
            if horizontal:
                x = self.left + (self.right - self.left) * value / top
                self.draw.line([(x, self.top), (x, self.bottom)], fill=GRID)
                self.draw.text((x, self.bottom + 4), _format(value), fill=INK, font=self.small, anchor="mt")
            else:
                y = self.bottom - (self.bottom - self.top) * value / top
                self.draw.line([(self.left, y), (self.right, y)], fill=GRID)
                self.draw.text((self.left - 4, y), _format(value), fill=INK, font=self.small, anchor="rm")
            value += step
        self.draw.rectangle([self.left, self.top, self.right, self.bottom], outline=INK)
        return top


def bar_chart(labels: list[str], values: list[float], title: str, width: int = 600, height: int | None = None,
              horizontal: bool = True, colour=PALETTE[0]) -> Image.Image:
    """Bars with their value written beside them; horizontal bars read best for long names."""
    labels = [" ".join(str(label).split()) for label in labels]  # Pillow cannot measure multi-line text
    values = [float(v) for v in values]
    if horizontal:
        probe = Chart(10, 10, "")
        label_width = max([probe.text_width(label[:40]) for label in labels] + [20]) + 12
        height = height or max(140, 50 + 18 * len(labels) + 30)
        chart = Chart(width, height, title, left=label_width, bottom=25)
        top = chart.value_axis(max(values + [1]) * 1.12, horizontal=True)
        slot = (chart.bottom - chart.top) / max(1, len(values))
        for index, (label, value) in enumerate(zip(labels, values)):
            y0 = chart.top + index * slot + slot * 0.15
            y1 = chart.top + (index + 1) * slot - slot * 0.15
            x1 = chart.left + (chart.right - chart.left) * value / top
            chart.draw.rectangle([chart.left, y0, max(chart.left + 1, x1), y1], fill=colour)
            middle = (y0 + y1) / 2
            chart.draw.text((chart.left - 6, middle), label[:40], fill=INK, font=chart.small, anchor="rm")
            chart.draw.text((x1 + 4, middle), _format(value), fill=INK, font=chart.small, anchor="lm")
        return chart.image
    return grouped_bars(labels, {"": values}, title, width=width, height=height or 300)


def grouped_bars(labels: list[str], series: dict[str, list[float]], title: str, width: int = 700,
                 height: int = 300) -> Image.Image:
    """Vertical bars, one group per label and one colour per series (with a legend)."""
    chart = Chart(width, height, title, left=55, bottom=55)
    maximum = max([max(v) if v else 0 for v in series.values()] + [1])
    top = chart.value_axis(maximum * 1.05, horizontal=False)
    slot = (chart.right - chart.left) / max(1, len(labels))
    bar = slot * 0.8 / max(1, len(series))
    for group, label in enumerate(labels):
        x_group = chart.left + group * slot + slot * 0.1
        for number, values in enumerate(series.values()):
            value = values[group]
            x0 = x_group + number * bar
            y = chart.bottom - (chart.bottom - chart.top) * value / top
            chart.draw.rectangle([x0, y, x0 + bar - 1, chart.bottom], fill=PALETTE[number % len(PALETTE)])
        chart.draw.text((chart.left + (group + 0.5) * slot, chart.bottom + 5), str(label)[:12], fill=INK,
                        font=chart.small, anchor="mt")
    names = [name for name in series if name]
    for number, name in enumerate(names):
        x = chart.right - 90
        y = chart.top + 8 + 16 * number
        chart.draw.rectangle([x, y, x + 10, y + 10], fill=PALETTE[number % len(PALETTE)])
        chart.draw.text((x + 15, y + 5), name, fill=INK, font=chart.small, anchor="lm")
    return chart.image


def histogram(edges: list[float], counts: list[float], title: str, xlabel: str, width: int = 600, height: int = 300,
              log_x: bool = False, colour=PALETTE[4]) -> Image.Image:
    """Counts per bin between consecutive ``edges``; ``log_x`` places bins on a log scale."""
    chart = Chart(width, height, title, left=55, bottom=45)
    top = chart.value_axis(max(list(counts) + [1]) * 1.05, horizontal=False)
    position = (lambda v: math.log10(max(v, 1e-9))) if log_x else (lambda v: v)
    low, high = position(edges[0]), position(edges[-1])
    span = (high - low) or 1.0

    def x_of(value):
        return chart.left + (chart.right - chart.left) * (position(value) - low) / span

    for left_edge, right_edge, count in zip(edges[:-1], edges[1:], counts):
        if count <= 0:
            continue
        y = chart.bottom - (chart.bottom - chart.top) * count / top
        chart.draw.rectangle([x_of(left_edge), y, max(x_of(left_edge) + 1, x_of(right_edge) - 1), chart.bottom], fill=colour)
    ticks = _log_ticks(edges[0], edges[-1]) if log_x else _linear_ticks(edges[0], edges[-1])
    for tick in ticks:
        x = x_of(tick)
        chart.draw.line([(x, chart.bottom), (x, chart.bottom + 3)], fill=INK)
        chart.draw.text((x, chart.bottom + 5), _format(tick), fill=INK, font=chart.small, anchor="mt")
    chart.draw.text(((chart.left + chart.right) / 2, chart.bottom + 22), xlabel, fill=INK, font=chart.small, anchor="mt")
    return chart.image


def _linear_ticks(low: float, high: float) -> list[float]:
    step = _nice_step(high - low)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    ticks, power = [], math.floor(math.log10(max(low, 1e-9)))
    while 10**power <= high:
        for factor in (1, 3):
            value = factor * 10**power
            if low <= value <= high:
                ticks.append(value)
        power += 1
    return ticks


def save_row(images: list[Image.Image], path: Path) -> Path:
    """Place panels side by side (tops aligned) and save one PNG."""
    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=False)
    return path
