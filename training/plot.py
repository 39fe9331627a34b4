"""A loss chart drawn with Pillow alone (no plotting library in the dependencies)."""

from __future__ import annotations


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard's smoothing slider."""
    out, running = [], 0.0
    for i, value in enumerate(values, 1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**i))
    return out


def loss_chart(losses: list[float], width: int = 640, height: int = 360, title: str = "training loss"):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 8), f"{title} ({len(losses)} steps)", fill=(0, 0, 0))
    if not losses:
        return image
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i, value):
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        y = bottom - (bottom - top) * ((value - low) / span)
        return x, y

    for fraction in (0.0, 0.5, 1.0):
        value = low + span * fraction
        _, y = point(0, value)
        draw.text((4, y - 6), f"{value:.4f}", fill=(80, 80, 80))
    draw.text((left, bottom + 8), "step 1", fill=(80, 80, 80))
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill=(80, 80, 80))
    raw = [point(i, v) for i, v in enumerate(losses)]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth(losses))], fill=(20, 60, 200), width=2)
    return image
