"""Convert a UI-format workflow (what ComfyUI saves, what example_workflows/ holds) to the API format
(what POST /prompt takes), using the server's /object_info for each node's widget order.

UI format: ``{"nodes": [{"id", "type", "mode", "inputs": [{"name", "link", "widget"?}], "widgets_values"}],
"links": [[id, from_node, from_slot, to_node, to_slot, type], ...]}``. ``widgets_values`` is positional
over the node's widget inputs (required, then optional, in ``input_order``); an INT/COMBO with a
"control after generate" widget (explicitly, or by the legacy rule: an INT named seed/noise_seed) has
one extra value after it, which the API prompt leaves out. Links win over widget values.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIP_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def widget_inputs(info: dict) -> list[tuple[str, bool]]:
    """[(input name, has a control widget)] in the order the frontend lays the widgets out."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"].get(section, {}).get(name)
            if spec is None:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):
                kind = "COMBO"
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            control = options.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            out.append((name, bool(control)))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # v1 schema
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in SKIP_TYPES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: type {node['type']} is not registered on this server")
        values = list(node.get("widgets_values") or [])
        widgets = widget_inputs(info)
        needed = sum(2 if control else 1 for _, control in widgets)
        if len(values) != needed:
            raise WorkflowError(
                f"node {node['id']} ({node['type']}): {len(values)} widget values, the server's node has {needed} "
                f"({[name for name, _ in widgets]})"
            )
        inputs = {}
        position = 0
        for name, control in widgets:
            inputs[name] = values[position]
            position += 2 if control else 1
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is None:
                continue
            if link not in links:
                raise WorkflowError(f"node {node['id']}: input {slot['name']} uses unknown link {link}")
            source, source_slot = links[link]
            if source not in nodes:
                raise WorkflowError(f"link {link} starts at missing node {source}")
            inputs[slot["name"]] = [str(source), int(source_slot)]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def set_widget(workflow: dict, node_id: int, name: str, value, object_info: dict) -> None:
    """Change one widget value of a UI workflow in place (e.g. the checkpoint a test has)."""
    node = next(n for n in workflow["nodes"] if n["id"] == node_id)
    position = 0
    for widget, control in widget_inputs(object_info[node["type"]]):
        if widget == name:
            node["widgets_values"][position] = value
            return
        position += 2 if control else 1
    raise KeyError(f"node {node_id} ({node['type']}) has no widget {name}")
