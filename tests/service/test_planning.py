"""service.repository.planning.plan on plain data: which versions to load, serve, wait for and retire."""

from service.repository.planning import ModelView, Plan, plan

A, B, C = ("inode-a", ()), ("inode-b", ()), ("inode-c", ())     # folder signatures


def test_a_fresh_start_loads_the_newest_versions_up_to_the_limit():
    assert plan(ModelView(on_disk={1: A, 2: B, 3: C}, serving={}), max_versions=2) == Plan(load=(3, 2))


def test_versions_serving_unchanged_stay_and_older_ones_retire():
    view = ModelView(on_disk={1: A, 2: B, 3: C}, serving={1: A, 2: B, 3: C})
    assert plan(view, max_versions=2) == Plan(serving=(3, 2), retire=(1,))


def test_a_new_version_is_loaded_beside_the_ones_serving():
    view = ModelView(on_disk={1: A, 2: B, 3: C}, serving={1: A, 2: B})
    assert plan(view, max_versions=2) == Plan(load=(3,), serving=(2,), retire=(1,))


def test_a_deleted_serving_folder_serves_on_and_counts():
    """The reload loop of issue 11: versions 1-3, max 2, version 3's folder deleted while it
    serves. It keeps its place, so version 1 is neither loaded nor retired, poll after poll."""
    view = ModelView(on_disk={1: A, 2: B}, serving={2: B, 3: C})
    first = plan(view, max_versions=2)
    assert first == Plan(serving=(3, 2))
    assert plan(view, max_versions=2) == first


def test_a_refused_version_is_not_tried_again_until_its_files_change():
    view = ModelView(on_disk={1: A, 2: B}, serving={1: A}, refused={2: B})
    assert plan(view, max_versions=1) == Plan(serving=(1,))
    changed = ModelView(on_disk={1: A, 2: C}, serving={1: A}, refused={2: B})
    assert plan(changed, max_versions=1) == Plan(load=(2,), retire=(1,))   # retired once 2 serves


def test_a_refused_re_export_leaves_the_old_export_serving():
    view = ModelView(on_disk={1: B}, serving={1: A}, refused={1: B})
    assert plan(view, max_versions=1) == Plan(serving=(1,))


def test_a_re_export_is_loaded_in_place_of_the_one_serving():
    view = ModelView(on_disk={1: B}, serving={1: A})
    assert plan(view, max_versions=1) == Plan(load=(1,))            # not retired meanwhile


def test_settling_waits_for_files_that_changed_since_the_previous_scan():
    copying = ModelView(on_disk={1: A, 2: C}, serving={1: A}, previous_scan={1: A, 2: B})
    assert plan(copying, max_versions=2) == Plan(serving=(1,), waiting=(2,))
    settled = ModelView(on_disk={1: A, 2: C}, serving={1: A}, previous_scan={1: A, 2: C})
    assert plan(settled, max_versions=2) == Plan(load=(2,), serving=(1,))
    started = ModelView(on_disk={1: A, 2: C}, serving={1: A})         # no settling at start-up
    assert plan(started, max_versions=2) == Plan(load=(2,), serving=(1,))


def test_held_versions_are_skipped_and_the_next_newest_takes_their_place():
    view = ModelView(on_disk={1: A, 2: B, 3: C}, serving={2: B}, held=frozenset({3}))
    assert plan(view, max_versions=2) == Plan(load=(1,), serving=(2,))


def test_a_failed_load_makes_the_next_plan_try_an_older_version():
    """The executor's loop: plan, load the first, plan again with the outcome."""
    on_disk = {1: A, 2: B, 3: C}
    first = plan(ModelView(on_disk=on_disk, serving={}), max_versions=1)
    assert first.load[0] == 3
    after_failure = plan(ModelView(on_disk=on_disk, serving={}, refused={3: C}), max_versions=1)
    assert after_failure == Plan(load=(2,))
    after_success = plan(ModelView(on_disk=on_disk, serving={2: B}, refused={3: C}), max_versions=1)
    assert after_success == Plan(serving=(2,))
