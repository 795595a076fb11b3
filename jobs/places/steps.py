"""The places crawl's steps: plan the area's first circles, search each circle × category
(an item of the map; a full answer splits the circle into smaller items), publish one dataset
of every unique place found."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jobs.errors import PermanentError
from jobs.maps import Expand, ItemContext
from jobs.pipelines import StepContext
from jobs.places.geometry import Circle, plan, split
from jobs.provider import ProviderClient
from ledger import JSON

#: The most places one search answers (the provider's cap); a full answer may hide more.
MAX_RESULTS = 20
#: The largest first circle of a crawl, in metres: an area larger than it is covered by several.
PLAN_RADIUS_M = 2_500.0
#: The smallest circle searched, in metres: a full circle whose children would be smaller is
#: recorded as saturated (it may hold more than one search answers) instead of split.
MIN_RADIUS_M = 25.0
#: The fields of a place kept from a search's answer (and published).
PLACE_FIELDS = ("id", "name", "lat", "lng", "category")


def area_of(context: Mapping[str, JSON]) -> Circle:
    """The crawl's area, as its event gave it (not snapped: the truth is asked for it)."""
    lat, lng, radius = (_number(context, name, "crawl") for name in ("lat", "lng", "radius_m"))
    return Circle(lat, lng, radius)


def categories_of(context: Mapping[str, JSON]) -> list[str]:
    """The crawl's categories, in the event's order."""
    value = context.get("categories")
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise PermanentError("crawl.categories is not a list of strings")
    return [str(name) for name in value]


def item_id(item: JSON) -> str:
    """An item's identity: its category and its circle's key (never its position), so the
    same circle and category reached twice is one item, one key, one billed query."""
    circle, category = circle_of(item), _text(_obj(item, "item"), "category", "item")
    return f"{category}@{circle.key()}"


def circle_of(item: JSON) -> Circle:
    """The circle an item searches."""
    fields = _obj(item, "item")
    lat, lng, radius = (_number(fields, name, "item") for name in ("lat", "lng", "radius_m"))
    return Circle(lat, lng, radius)


def new_item(circle: Circle, category: str, level: int) -> dict[str, JSON]:
    """The item searching `circle` for `category`; `level` is how many splits led to it (a
    function of its radius in one crawl, so the same id always comes with the same item)."""
    return {**circle.to_json(), "category": category, "level": level}


def plan_circles(ctx: StepContext[ProviderClient]) -> JSON:
    """The first circles covering the crawl's area, none larger than `PLAN_RADIUS_M`."""
    planned = plan(area_of(ctx.context), max_radius_m=PLAN_RADIUS_M)
    circles: list[JSON] = [{**circle.to_json()} for circle in planned]
    return {"circles": circles}


def search_items(ctx: StepContext[ProviderClient]) -> JSON:
    """The map's first items: every planned circle × every category."""
    planned = _obj(ctx.results.get("plan"), "plan's result").get("circles")
    if not isinstance(planned, list):
        raise PermanentError("plan's result has no list of circles")
    circles = [circle_of(circle) for circle in planned]
    return [
        new_item(circle, category, 0)
        for category in categories_of(ctx.context)
        for circle in circles
    ]


def search(ctx: ItemContext[ProviderClient]) -> JSON | Expand:
    """Search one circle for one category (billed once: the item's key goes with it)."""
    circle = circle_of(ctx.item)
    fields = _obj(ctx.item, "item")
    category, level = _text(fields, "category", "item"), fields.get("level")
    answer = ctx.resources.post(
        "/places/search", {**circle.to_json(), "category": category}, idempotency_key=ctx.key
    )
    places: list[JSON] = [_place(p) for p in _list(answer.get("places"), "search.places")]
    depth = level if isinstance(level, int) else 0
    return searched(circle, category, depth, places, area_of(ctx.context))


def searched(
    circle: Circle, category: str, level: int, places: list[JSON], area: Circle
) -> JSON | Expand:
    """What a search's answer makes of its item: its places, and if the answer is full the
    children of its circle that touch the area, or (at the smallest radius) `saturated`."""
    result: dict[str, JSON] = {"places": places, "level": level}
    if len(places) < MAX_RESULTS:
        return result
    children = split(circle, min_radius_m=MIN_RADIUS_M, area=area)
    if not children:
        return {**result, "saturated": True}
    items: list[JSON] = [new_item(child, category, level + 1) for child in children]
    return Expand(items=items, result={**result, "split": len(children)})


def publish(ctx: StepContext[ProviderClient]) -> JSON:
    """Publish one dataset: every place found in the area (of the crawl's categories),
    once each, in id order; the result holds the figures, not the places."""
    area, categories = area_of(ctx.context), set(categories_of(ctx.context))
    found: dict[str, Mapping[str, JSON]] = {}
    figures = {"queries": 0, "full": 0, "split": 0, "saturated": 0, "levels": 0, "answers": 0}
    for each in ctx.items("search"):
        result = _obj(each.result, f"item {each.item_id}'s result")
        places = _list(result.get("places"), f"item {each.item_id}'s places")
        figures["queries"] += 1
        figures["answers"] += len(places)
        figures["full"] += len(places) >= MAX_RESULTS
        figures["split"] += isinstance(result.get("split"), int)
        figures["saturated"] += result.get("saturated") is True
        level = result.get("level")
        if isinstance(level, int):
            figures["levels"] = max(figures["levels"], level)
        for place in _inside(places, area, categories):
            found.setdefault(_text(place, "id", "place"), place)
    dataset = [dict(found[place_id]) for place_id in sorted(found)]
    published = ctx.resources.post(
        "/datasets",
        {"crawl_id": ctx.context["crawl_id"], "places": list(dataset)},
        idempotency_key=ctx.key,
    )
    return {"dataset_id": published.get("id"), "places": len(dataset), **figures}


def _inside(
    places: Iterable[JSON], area: Circle, categories: set[str]
) -> Iterable[Mapping[str, JSON]]:
    """The places within the area and of the crawl's categories (an edge circle reaches out)."""
    for value in places:
        place = _obj(value, "place")
        lat, lng = _number(place, "lat", "place"), _number(place, "lng", "place")
        if place.get("category") in categories and area.contains(lat, lng):
            yield place


def _place(value: JSON) -> dict[str, JSON]:
    place = _obj(value, "search.places[]")
    missing = [name for name in PLACE_FIELDS if name not in place]
    if missing:
        raise PermanentError(f"a place the search answered lacks {', '.join(missing)}")
    return {name: place[name] for name in PLACE_FIELDS}


def _obj(value: JSON | None, what: str) -> Mapping[str, JSON]:
    if not isinstance(value, dict):
        raise PermanentError(f"{what} is not a JSON object")
    return value


def _list(value: JSON | None, what: str) -> list[JSON]:
    if not isinstance(value, list):
        raise PermanentError(f"{what} is not a list")
    return value


def _text(source: Mapping[str, JSON], field: str, what: str) -> str:
    value = source.get(field)
    if not isinstance(value, str):
        raise PermanentError(f"{what}.{field} is not a string")
    return value


def _number(source: Mapping[str, JSON], field: str, what: str) -> float:
    value = source.get(field)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PermanentError(f"{what}.{field} is not a number")
    return float(value)
