# -*- test-case-name: tests.test_lab -*-
"""
C{lab draw}: the topology as an SVG picture, written by hand (circles, lines,
text). Each link is labelled, per direction, with the messages relayed over
it and their median delay at the sending node (arrival to acceptance by the
next hop), from the event logs. Cut links (netns mode) are dashed, stopped
nodes grey.

L{render} is pure: nodes, links and statistics in, SVG text out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence
from xml.sax.saxutils import escape

from relaynet.lab.observe import LinkStat

WIDTH_PER_LAYER = 250
NODE_R = 34


def _layers(names: Sequence[str], edges: Mapping[str, Sequence[str]], entry: Sequence[str]) -> dict[str, int]:
    """Distance of each node from the entry nodes along routes (breadth first)."""
    layer = {e: 0 for e in entry if e in names}
    if not layer and names:
        layer = {names[0]: 0}
    frontier = list(layer)
    for _ in range(len(names)):
        nxt = []
        for n in frontier:
            for m in edges.get(n, ()):
                if m not in layer:
                    layer[m] = layer[n] + 1
                    nxt.append(m)
        frontier = nxt
    deepest = max(layer.values(), default=0)
    for n in names:
        layer.setdefault(n, deepest + 1)
    return layer


def positions(names: Sequence[str], edges: Mapping[str, Sequence[str]], entry: Sequence[str],
              layout: str) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Node centres and the picture's width and height."""
    pos: dict[str, tuple[float, float]] = {}
    if layout == "circle":
        degree = {n: len(set(edges.get(n, ())) | {m for m in names if n in edges.get(m, ())}) for n in names}
        hub = max(names, key=lambda n: degree[n]) if names else None
        ring = [n for n in names if n != hub] if hub and len(names) > 3 and degree[hub] >= len(names) - 1 else list(names)
        radius = max(230.0, 70.0 * len(ring) / math.pi)
        cx, cy = radius + 160, radius + 70
        if len(ring) != len(names) and hub is not None:
            pos[hub] = (cx, cy)
        for i, n in enumerate(ring):
            a = 2 * math.pi * i / max(1, len(ring)) - math.pi / 2
            pos[n] = (cx + radius * math.cos(a), cy + radius * math.sin(a))
        return pos, 2 * cx, 2 * cy
    layer = _layers(names, edges, entry)
    columns: dict[int, list[str]] = {}
    for n in names:
        columns.setdefault(layer[n], []).append(n)
    tallest = max((len(c) for c in columns.values()), default=1)
    height = max(260.0, 150.0 * tallest + 80)
    for col, members in columns.items():
        for i, n in enumerate(members):
            pos[n] = (110 + col * WIDTH_PER_LAYER, height * (i + 1) / (len(members) + 1))
    width = 220 + WIDTH_PER_LAYER * max(columns, default=0)
    return pos, width, height


def _fmt_delay(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def render(title: str, nodes: Mapping[str, Mapping[str, Any]], links: Sequence[Mapping[str, Any]],
           stats: Sequence[LinkStat], entry: Sequence[str], layout: str = "layers",
           alive: Mapping[str, bool] | None = None) -> str:
    """
    The SVG document.

    @param nodes: node name -> record (C{address}, C{ports}, C{role}, C{neighbours}).
    @param links: C{{"a", "b", "up"}} per link.
    @param stats: per-direction link statistics.
    @param alive: node -> running (missing: assumed running).
    """
    names = list(nodes)
    edges = {n: list(nodes[n].get("neighbours", [])) for n in names}
    pos, width, height = positions(names, edges, entry, layout)
    height += 40
    by_dir = {(s.src, s.dst): s for s in stats}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="11">',
        f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for lk in links:
        a, b = lk["a"], lk["b"]
        if a not in pos or b not in pos:
            continue
        (x1, y1), (x2, y2) = pos[a], pos[b]
        dx, dy = x2 - x1, y2 - y1
        dist = math.hypot(dx, dy) or 1.0
        ux, uy = dx / dist, dy / dist
        total = sum(s.count for k, s in by_dir.items() if set(k) == {a, b})
        stroke = 1.5 + min(6.0, math.log1p(total))
        style = 'stroke="#c00" stroke-dasharray="6,4"' if not lk.get("up", True) else 'stroke="#555"'
        out.append(
            f'<line class="link" data-a="{escape(a)}" data-b="{escape(b)}" '
            f'x1="{x1 + ux * NODE_R:.1f}" y1="{y1 + uy * NODE_R:.1f}" '
            f'x2="{x2 - ux * NODE_R:.1f}" y2="{y2 - uy * NODE_R:.1f}" {style} stroke-width="{stroke:.1f}"/>'
        )
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        for side, (src, dst) in ((-1, (a, b)), (1, (b, a))):
            s = by_dir.get((src, dst))
            if s is None:
                continue
            lines = [f"{src}\u2192{dst}", f"{s.count} msg, p50 {_fmt_delay(s.median_delay)}"]
            if s.deferred:
                lines.append(f"{s.deferred} failed attempts")
            # One direction's label on each side of the link: above/below a
            # flat link, left/right of a steep one.
            steep = abs(ux) < 0.45
            for i, text in enumerate(lines):
                if steep:
                    x = mx + 8 * side
                    y = my - 6 * len(lines) + 12 * i + 4
                    anchor = "start" if side > 0 else "end"
                else:
                    x = mx
                    y = my - 8 - 12 * (len(lines) - 1 - i) if side < 0 else my + 16 + 12 * i
                    anchor = "middle"
                out.append(
                    f'<text class="label" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" '
                    f'font-size="10" fill="#036" stroke="white" stroke-width="3" paint-order="stroke">'
                    f'{escape(text)}</text>'
                )
        if not lk.get("up", True):
            out.append(f'<text x="{mx:.1f}" y="{my - 16:.1f}" text-anchor="middle" fill="#c00">cut</text>')
    for n in names:
        x, y = pos[n]
        rec = nodes[n]
        up = True if alive is None else alive.get(n, True)
        fill = "#e8f0ff" if up else "#ddd"
        out.append(f'<circle class="node" data-node="{escape(n)}" cx="{x:.1f}" cy="{y:.1f}" r="{NODE_R}" '
                   f'fill="{fill}" stroke="#036" stroke-width="2"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{escape(n)}</text>')
        where = f"{rec.get('address', '')}:{rec.get('ports', [''])[0]}"
        out.append(f'<text x="{x:.1f}" y="{y + NODE_R + 14:.1f}" text-anchor="middle">{escape(where)}</text>')
        role = str(rec.get("role", "")) + ("" if up else " (down)")
        out.append(f'<text x="{x:.1f}" y="{y + NODE_R + 27:.1f}" text-anchor="middle" '
                   f'fill="#666">{escape(role)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
