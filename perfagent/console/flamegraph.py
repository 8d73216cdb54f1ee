"""Collapsed stacks (``a;b;c count``) drawn as an SVG icicle graph: root on top."""

from __future__ import annotations

import zlib
from html import escape
from typing import Any

ROW = 18


def _tree(stacks: dict[str, int]) -> dict[str, Any]:
    root: dict[str, Any] = {"name": "all", "count": 0, "children": {}}
    for stack, count in stacks.items():
        node = root
        root["count"] += count
        for part in stack.split(";"):
            child = node["children"].get(part)
            if child is None:
                child = node["children"][part] = {"name": part, "count": 0, "children": {}}
            child["count"] += count
            node = child
    return root


def svg(stacks: dict[str, int], width: int = 1200, label: str = "flame graph") -> str:
    """The icicle graph; each box's tooltip has the frame, its samples and share."""
    if not stacks:
        return '<p class="muted">No samples yet: they are taken while a request runs slow.</p>'
    root = _tree(stacks)
    total = root["count"]
    boxes: list[str] = []
    depth_seen = [0]

    def draw(node: dict[str, Any], x: float, depth: int) -> None:
        w = node["count"] / total * width
        if w < 0.6:
            return
        depth_seen[0] = max(depth_seen[0], depth)
        y = depth * ROW
        share = node["count"] / total * 100
        name = escape(node["name"])
        hue = 20 + zlib.crc32(node["name"].encode()) % 40  # stable colours across pages
        text = ""
        if w > 40:
            chars = int(w / 7)
            shown = node["name"] if len(node["name"]) <= chars else node["name"][: chars - 1] + "…"
            text = f'<text x="{x + 3:.1f}" y="{y + 13}">{escape(shown)}</text>'
        boxes.append(
            f"<g><title>{name} · {node['count']} samples · {share:.1f}%</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.5):.1f}" height="{ROW - 1}" '
            f'fill="hsl({hue},85%,62%)"/>{text}</g>'
        )
        offset = x
        for child in sorted(node["children"].values(), key=lambda c: -c["count"]):
            draw(child, offset, depth + 1)
            offset += child["count"] / total * width

    draw(root, 0.0, 0)
    height = (depth_seen[0] + 1) * ROW
    return (
        f'<svg class="flame" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}" style="font-size:11px">{"".join(boxes)}</svg>'
    )
