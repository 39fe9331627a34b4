"""A loss chart drawn with Pillow alone (no plotting library in the dependencies)."""

from __future__ import annotations

import math


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard's smoothing slider."""
    out, running = [], 0.0
    for i, value in enumerate(values, 1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**i))
    return out


VALIDATION_COLOUR = (20, 150, 60)


def loss_chart(losses: list[float], width: int = 640, height: int = 360, title: str = "training loss",
               validation: list[tuple[int, float]] | None = None):
    """The training loss per step (raw and smoothed) and, with ``validation`` [(step, loss), ...] (step 0:
    before training), the validation loss as a second series on the same axes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 8), f"{title} ({len(losses)} steps)", fill=(0, 0, 0))
    validation = sorted((int(s), float(v)) for s, v in (validation or []) if math.isfinite(v))
    if not losses and not validation:
        return image
    values = list(losses) + [v for _, v in validation]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    last_step = max(len(losses), validation[-1][0] if validation else 0, 1)
    first_step = 0 if validation and validation[0][0] == 0 else 1

    def at_step(step, value):
        x = left + (right - left) * ((step - first_step) / max(1, last_step - first_step))
        y = bottom - (bottom - top) * ((value - low) / span)
        return x, y

    def point(i, value):  # losses[i] is step i + 1
        return at_step(i + 1, value)

    for fraction in (0.0, 0.5, 1.0):
        value = low + span * fraction
        _, y = point(0, value)
        draw.text((4, y - 6), f"{value:.4f}", fill=(80, 80, 80))
    draw.text((left, bottom + 8), f"step {first_step}", fill=(80, 80, 80))
    draw.text((right - 60, bottom + 8), f"step {last_step}", fill=(80, 80, 80))
    raw = [point(i, v) for i, v in enumerate(losses)]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth(losses))], fill=(20, 60, 200), width=2)
    if validation:
        marks = [at_step(s, v) for s, v in validation]
        if len(marks) > 1:
            draw.line(marks, fill=VALIDATION_COLOUR, width=2)
        for x, y in marks:
            draw.rectangle((x - 2, y - 2, x + 2, y + 2), fill=VALIDATION_COLOUR)
        best_step, best = min(validation, key=lambda p: (p[1], p[0]))
        draw.text((right - 260, 8), f"validation: last {validation[-1][1]:.4f}, best {best:.4f} @ step {best_step}",
                  fill=VALIDATION_COLOUR)
    return image
