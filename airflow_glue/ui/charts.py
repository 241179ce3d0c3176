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


def timeline(segments: list[dict]) -> str:
    """A video's segments on its time axis: one lane per label (named on the left), each segment a block
    from its start to its end second, darker the higher its score; its exact figures on hover."""
    if not segments:
        return '<p class="empty">no segments: the night that scored this video kept none (its `segments` param)</p>'
    lanes = list(dict.fromkeys(s["label"] for s in segments))
    end = max(s["end_second"] for s in segments)
    scale = BAR_WIDTH * 1.5 / max(end, 1)
    top = max(s["score"] for s in segments) or 1
    height = len(lanes) * (BAR_HEIGHT + GAP) + 16
    width = LABEL_WIDTH + BAR_WIDTH * 1.5 + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width:.0f}" height="{height}" role="img">'
    ]
    for i, lane in enumerate(lanes):
        y = i * (BAR_HEIGHT + GAP)
        out.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end" font-size="12">{escape(lane)}</text>')
        out.append(f'<rect x="{LABEL_WIDTH}" y="{y}" width="{end * scale:.1f}" height="{BAR_HEIGHT}" fill="#eee"/>')
    for s in segments:
        y = lanes.index(s["label"]) * (BAR_HEIGHT + GAP)
        x, length = LABEL_WIDTH + s["start_second"] * scale, (s["end_second"] - s["start_second"]) * scale
        opacity = 0.3 + 0.7 * s["score"] / top
        hover = f"{s['label']}: {s['start_second']}-{s['end_second']} s, score {s['score']:.3f}"
        out.append(
            f'<rect class="segment" x="{x:.1f}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" '
            f'fill="#2e86c1" fill-opacity="{opacity:.2f}"><title>{escape(hover)}</title></rect>'
        )
    axis_y = len(lanes) * (BAR_HEIGHT + GAP) + 12
    for second in range(0, end + 1, max(5, (end // 10) // 5 * 5 or 5)):
        out.append(f'<text x="{LABEL_WIDTH + second * scale:.1f}" y="{axis_y}" font-size="10">{second}s</text>')
    out.append("</svg>")
    return "".join(out)


SERIES_COLOURS = ("#017cee", "#2f855a", "#dd6b20", "#805ad5")
PLOT_WIDTH, PLOT_HEIGHT, MARGIN = 560, 200, 40


def lines(points: list[dict], series: list[tuple[str, str]], x: str = "version") -> str:
    """Metrics in [0, 1] over versions: one line per (key, name) of `series` through `points` (dicts holding
    `x` and each key), the x axis labelled v<version>, each point's exact value on hover."""
    if not points:
        return '<p class="empty">no evaluations to chart</p>'
    step = PLOT_WIDTH / max(1, len(points) - 1)
    width, height = PLOT_WIDTH + 2 * MARGIN + 90, PLOT_HEIGHT + 2 * MARGIN

    def at(i: int, value: float) -> tuple[float, float]:
        return MARGIN + i * step, MARGIN + (1 - max(0.0, min(1.0, value))) * PLOT_HEIGHT

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lines" width="{width}" height="{height}" role="img">']
    for tick in (0, 0.25, 0.5, 0.75, 1):
        _, y = at(0, tick)
        out.append(
            f'<line x1="{MARGIN}" x2="{MARGIN + PLOT_WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#8884" stroke-width="1"/>'
            f'<text x="{MARGIN - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick:g}</text>'
        )
    for i, point in enumerate(points):
        px, _ = at(i, 0)
        out.append(
            f'<text x="{px:.1f}" y="{MARGIN + PLOT_HEIGHT + 16}" text-anchor="middle" font-size="11">'
            f"v{escape(str(point[x]))}</text>"
        )
    for n, (key, name) in enumerate(series):
        colour = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        xy = [at(i, float(p[key])) for i, p in enumerate(points)]
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}"/>'
        )
        for (a, b), point in zip(xy, points):
            out.append(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{colour}"><title>{escape(name)} of version '
                f"{escape(str(point[x]))}: {float(point[key]):.4f}</title></circle>"
            )
        legend_y = MARGIN + n * 18
        out.append(
            f'<rect x="{MARGIN + PLOT_WIDTH + 16}" y="{legend_y - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{MARGIN + PLOT_WIDTH + 34}" y="{legend_y + 1}" font-size="12">{escape(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
