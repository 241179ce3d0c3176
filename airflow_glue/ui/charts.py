"""Horizontal SVG bar charts drawn on the server: the pages load no script or stylesheet from anywhere."""

from html import escape

BAR_HEIGHT, GAP, LABEL_WIDTH, BAR_WIDTH = 16, 4, 220, 360


def bars(rows: list[tuple[str, float]], signed: bool = False) -> str:
    """One bar per (name, value); `signed` centres the axis so negative values (deltas) go left."""
    if not rows:
        return '<p class="empty">no data</p>'
    top = max(abs(v) for _, v in rows) or 1
    half = BAR_WIDTH / 2 if signed else 0
    scale = (BAR_WIDTH - half) / top
    height = len(rows) * (BAR_HEIGHT + GAP)
    width = LABEL_WIDTH + BAR_WIDTH + 80
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (name, value) in enumerate(rows):
        y = i * (BAR_HEIGHT + GAP)
        length = abs(value) * scale
        x = LABEL_WIDTH + half - (length if value < 0 else 0)
        colour = "#c0392b" if value < 0 else "#2e86c1"
        out.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end" font-size="12">{escape(name)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{colour}"/>'
            f'<text x="{LABEL_WIDTH + BAR_WIDTH + 6}" y="{y + 12}" font-size="12">{value:+g}</text>'
            if signed
            else f'<text x="{LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end" font-size="12">{escape(name)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{colour}"/>'
            f'<text x="{LABEL_WIDTH + BAR_WIDTH + 6}" y="{y + 12}" font-size="12">{value:g}</text>'
        )
    out.append("</svg>")
    return "".join(out)
