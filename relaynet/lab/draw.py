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

from attrs import define, field, frozen

from relaynet.lab.observe import LinkStat

WIDTH_PER_LAYER = 300
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
    height = max(260.0, 220.0 * tallest + 40)
    for col, members in columns.items():
        for i, n in enumerate(members):
            pos[n] = (110 + col * WIDTH_PER_LAYER, height * (i + 1) / (len(members) + 1))
    width = 220 + WIDTH_PER_LAYER * max(columns, default=0)
    return pos, width, height


def _fmt_delay(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# Text metrics of the monospace font the picture asks for: a character is
# 0.6 em wide; a line of text is LINE_EM em high.
CHAR_EM = 0.6
LINE_EM = 1.2
GAP = 6.0
"""Clearance, in pixels, between a label and any line, circle or other label."""


@frozen
class Box:
    """An axis-aligned rectangle: a label's extent."""

    x0: float
    y0: float
    x1: float
    y1: float

    def grown(self, by: float) -> "Box":
        return Box(self.x0 - by, self.y0 - by, self.x1 + by, self.y1 + by)

    def overlaps(self, other: "Box") -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


def text_box(x: float, baseline: float, text: str, size: float, anchor: str = "middle") -> Box:
    """
    The extent of one line of monospace text drawn at C{(x, baseline)}.

    @param anchor: the SVG C{text-anchor}: C{start}, C{middle} or C{end}.
    """
    w = len(text) * CHAR_EM * size
    x0 = {"start": x, "middle": x - w / 2, "end": x - w}[anchor]
    return Box(x0, baseline - 0.8 * size, x0 + w, baseline + 0.25 * size)


def segment_hits_box(p: tuple[float, float], q: tuple[float, float], box: Box) -> bool:
    """Whether the segment C{p}-C{q} passes through C{box} (Liang-Barsky clipping)."""
    (x1, y1), (x2, y2) = p, q
    dx, dy = x2 - x1, y2 - y1
    lo, hi = 0.0, 1.0
    for step, room in ((-dx, x1 - box.x0), (dx, box.x1 - x1), (-dy, y1 - box.y0), (dy, box.y1 - y1)):
        if step == 0:
            if room < 0:
                return False
            continue
        t = room / step
        if step < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        if lo > hi:
            return False
    return True


def _circle_hits_box(c: tuple[float, float], r: float, box: Box) -> bool:
    nx = min(max(c[0], box.x0), box.x1)
    ny = min(max(c[1], box.y0), box.y1)
    return math.hypot(c[0] - nx, c[1] - ny) < r


@define
class _Placer:
    """
    Places text blocks where no link, node or earlier block is: the first
    free candidate position wins, else the one with the fewest collisions.
    """

    segments: list[tuple[tuple[float, float], tuple[float, float]]]
    circles: list[tuple[float, float]]
    placed: list[Box] = field(factory=list)

    def collisions(self, box: Box) -> int:
        near = box.grown(GAP)
        return (sum(segment_hits_box(p, q, near) for p, q in self.segments)
                + sum(_circle_hits_box(c, NODE_R, near) for c in self.circles)
                + sum(near.overlaps(b) for b in self.placed))

    def place(self, centres: list[tuple[float, float]], lines: list[str], size: float) -> tuple[float, float]:
        """The centre chosen for a block of C{lines} among C{centres} (in order of preference)."""
        best, best_hits = centres[0], -1
        for c in centres:
            hits = self.collisions(_block_box(c, lines, size))
            if best_hits < 0 or hits < best_hits:
                best, best_hits = c, hits
            if hits == 0:
                break
        self.placed.append(_block_box(best, lines, size))
        return best


def _block_size(lines: list[str], size: float) -> tuple[float, float]:
    return max(len(t) for t in lines) * CHAR_EM * size, len(lines) * LINE_EM * size


def _block_box(centre: tuple[float, float], lines: list[str], size: float) -> Box:
    w, h = _block_size(lines, size)
    return Box(centre[0] - w / 2, centre[1] - h / 2, centre[0] + w / 2, centre[1] + h / 2)


def _block(centre: tuple[float, float], lines: list[str], size: float, attrs: str,
           fills: list[str] | None = None) -> list[str]:
    """SVG text elements for a block of lines centred on C{centre}."""
    _, h = _block_size(lines, size)
    top = centre[1] - h / 2
    out = []
    for i, text in enumerate(lines):
        baseline = top + LINE_EM * size * i + 0.95 * size
        fill = f' fill="{fills[i]}"' if fills else ""
        out.append(f'<text x="{centre[0]:.1f}" y="{baseline:.1f}" text-anchor="middle" font-size="{size:g}"'
                   f'{fill} {attrs}>{escape(text)}</text>')
    return out


def render(title: str, nodes: Mapping[str, Mapping[str, Any]], links: Sequence[Mapping[str, Any]],
           stats: Sequence[LinkStat], entry: Sequence[str], layout: str = "layers",
           alive: Mapping[str, bool] | None = None) -> str:
    """
    The SVG document.

    Labels (a node's address and role, a link's per-direction counts) are
    placed where no link passes through them and no other label or node
    is: a node's below, above or beside it; a link's on its side of the
    line, moved clear of it by the label's extent, near the middle first.

    @param nodes: node name -> record (C{address}, C{ports}, C{role}, C{neighbours}).
    @param links: C{{"a", "b", "up"}} per link.
    @param stats: per-direction link statistics.
    @param alive: node -> running (missing: assumed running).
    """
    names = list(nodes)
    edges = {n: list(nodes[n].get("neighbours", [])) for n in names}
    pos, width, height = positions(names, edges, entry, layout)
    by_dir = {(s.src, s.dst): s for s in stats}
    drawn = [lk for lk in links if lk["a"] in pos and lk["b"] in pos]
    segments = []
    for lk in drawn:
        (x1, y1), (x2, y2) = pos[lk["a"]], pos[lk["b"]]
        dist = math.hypot(x2 - x1, y2 - y1) or 1.0
        ux, uy = (x2 - x1) / dist, (y2 - y1) / dist
        segments.append(((x1 + ux * NODE_R, y1 + uy * NODE_R), (x2 - ux * NODE_R, y2 - uy * NODE_R)))
    placer = _Placer(segments, [pos[n] for n in names])
    body: list[str] = []
    for lk, (p, q) in zip(drawn, segments):
        a, b = lk["a"], lk["b"]
        total = sum(s.count for k, s in by_dir.items() if set(k) == {a, b})
        stroke = 1.5 + min(6.0, math.log1p(total))
        style = 'stroke="#c00" stroke-dasharray="6,4"' if not lk.get("up", True) else 'stroke="#555"'
        body.append(
            f'<line class="link" data-a="{escape(a)}" data-b="{escape(b)}" '
            f'x1="{p[0]:.1f}" y1="{p[1]:.1f}" x2="{q[0]:.1f}" y2="{q[1]:.1f}" {style} stroke-width="{stroke:.1f}"/>'
        )
    node_text: list[str] = []
    for n in names:
        x, y = pos[n]
        rec = nodes[n]
        up = True if alive is None else alive.get(n, True)
        fill = "#e8f0ff" if up else "#ddd"
        body.append(f'<circle class="node" data-node="{escape(n)}" cx="{x:.1f}" cy="{y:.1f}" r="{NODE_R}" '
                    f'fill="{fill}" stroke="#036" stroke-width="2"/>')
        node_text.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" font-size="13" '
                         f'font-weight="bold">{escape(n)}</text>')
        lines = [f"{rec.get('address', '')}:{rec.get('ports', [''])[0]}",
                 str(rec.get("role", "")) + ("" if up else " (down)")]
        w, h = _block_size(lines, 11)
        around = NODE_R + GAP
        centre = placer.place([
            (x, y + around + h / 2), (x, y - around - h / 2),
            (x + around + w / 2, y), (x - around - w / 2, y),
            (x + around + w / 2, y + around + h / 2), (x - around - w / 2, y + around + h / 2),
            (x + around + w / 2, y - around - h / 2), (x - around - w / 2, y - around - h / 2),
        ], lines, 11)
        node_text += _block(centre, lines, 11, f'class="node-label" data-node="{escape(n)}"', ["#000", "#666"])
    for lk, (p, q) in zip(drawn, segments):
        a, b = lk["a"], lk["b"]
        dist = math.hypot(q[0] - p[0], q[1] - p[1]) or 1.0
        ux, uy = (q[0] - p[0]) / dist, (q[1] - p[1]) / dist
        blocks: list[tuple[int, list[str], str]] = []
        for side, (src, dst) in ((-1, (a, b)), (1, (b, a))):
            s = by_dir.get((src, dst))
            if s is not None:
                lines = [f"{src}\u2192{dst}", f"{s.count} msg, p50 {_fmt_delay(s.median_delay)}"]
                if s.deferred:
                    lines.append(f"{s.deferred} failed attempts")
                blocks.append((side, lines, "#036"))
        if not lk.get("up", True):
            blocks.append((-1 if len(blocks) != 1 or blocks[0][0] > 0 else 1, ["cut"], "#c00"))
        for side, lines, colour in blocks:
            # One direction's label on each side of the line, pushed out
            # along the normal by the block's extent in that direction.
            # When that side is full (two links meeting at a narrow angle),
            # the other side, then further out.
            w, h = _block_size(lines, 10)
            centres = []
            for sign in (side, -side):
                nx, ny = -uy * sign, ux * sign
                reach = abs(nx) * w / 2 + abs(ny) * h / 2 + GAP + 2
                for extra in (0.0, 14.0, 28.0, 48.0):
                    for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
                        mx, my = p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t
                        centres.append((mx + nx * (reach + extra), my + ny * (reach + extra)))
            centre = placer.place(centres, lines, 10)
            node_text += _block(
                centre, lines, 10,
                f'class="label" data-a="{escape(a)}" data-b="{escape(b)}" stroke="white" stroke-width="3" '
                'paint-order="stroke"', [colour] * len(lines),
            )
    # The picture covers everything placed (labels may reach past the layout).
    boxes = placer.placed + [Box(x - NODE_R, y - NODE_R, x + NODE_R, y + NODE_R) for x, y in pos.values()]
    x0 = min([0.0] + [bx.x0 - 10 for bx in boxes])
    y0 = min([0.0] + [bx.y0 - 34 for bx in boxes])  # room for the title above
    x1 = max([x0 + 300] + [bx.x1 + 10 for bx in boxes])
    y1 = max([y0 + 100] + [bx.y1 + 10 for bx in boxes])
    w, h = x1 - x0, y1 - y0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="{x0:.0f} {y0:.0f} {w:.0f} {h:.0f}" font-family="monospace" font-size="11">',
        f'<rect x="{x0:.0f}" y="{y0:.0f}" width="{w:.0f}" height="{h:.0f}" fill="white"/>',
        f'<text class="title" x="{x0 + 10:.0f}" y="{y0 + 18:.0f}" font-size="14" font-weight="bold">'
        f'{escape(title)}</text>',
        *body, *node_text, "</svg>",
    ]
    return "\n".join(out) + "\n"
