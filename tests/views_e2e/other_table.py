"""A view named like ``fk_card`` (tests.views_e2e.fake_views) but fed by table ``fk-other``:
another deployment's view on the same Redis, for the one-namespace-one-source tests."""

from viewkeeper import Value, redis_view


@redis_view(table="fk-other", redis="cache", name="fk_card")
def other_card(item):  # type: ignore[no-untyped-def]
    yield Value(f"fk:{item['pk']}", f"other-{item['v']}")
