"""Which versions of one model to serve: a pure function of what is on disk, what is in memory,
what was refused and what an admin holds. service.repository.model_repository scans
(service.repository.scan), then asks plan() what to do, does the first load, and asks again (a
load that fails changes the answer: the next older version is tried instead), until nothing is
left to load; then it retires what the plan leaves out.

The rules, newest version first, until the model's version policy is met (serving.json, else
the newest STEPNET_MAX_VERSIONS; `all`: no limit; `specific`: only the versions it lists):
- a version held by an admin, or not allowed by the policy, is skipped;
- a version serving unchanged keeps serving, and so does one whose folder is gone (only an admin
  unload takes it out);
- a version refused with these very files is not tried again; if an older export of it serves,
  that one serves on;
- when settling (polling), a version whose files changed since the previous scan is waited for
  (a copy in place is still running); an older export of it serves on meanwhile;
- anything else is loaded.
Serving versions the policy leaves out are retired.
"""

from dataclasses import dataclass, field

Signature = tuple        # a version folder's inode and its files' names, sizes and mtimes


@dataclass(frozen=True)
class Plan:
    load: tuple[int, ...] = ()        # to load, newest first (the executor does the first)
    serving: tuple[int, ...] = ()     # serve, as they are
    waiting: tuple[int, ...] = ()     # files still changing
    retire: tuple[int, ...] = ()      # serving now, not wanted: retire once nothing is left to load


@dataclass(frozen=True)
class ModelView:
    """One model as plan() sees it."""
    on_disk: dict[int, Signature]
    serving: dict[int, Signature]                        # in memory and ready, with their files
    refused: dict[int, Signature] = field(default_factory=dict)
    held: frozenset[int] = frozenset()                   # versions an admin unloaded
    previous_scan: dict[int, Signature] | None = None    # None: do not wait for changing files


def plan(view: ModelView, max_versions: int | None, allowed: frozenset[int] | None = None) -> Plan:
    """max_versions: None for no limit; allowed: the only versions to serve (None: any)."""
    load: list[int] = []
    serving: list[int] = []
    waiting: list[int] = []
    for version in sorted(view.on_disk.keys() | view.serving.keys(), reverse=True):
        if max_versions is not None and len(serving) + len(load) == max_versions:
            break
        if version in view.held or (allowed is not None and version not in allowed):
            continue
        on_disk, in_memory = view.on_disk.get(version), view.serving.get(version)
        if in_memory is not None and (on_disk is None or on_disk == in_memory):
            serving.append(version)
        elif view.refused.get(version) == on_disk:
            if in_memory is not None:
                serving.append(version)
        elif view.previous_scan is not None and view.previous_scan.get(version) != on_disk:
            waiting.append(version)
            if in_memory is not None:
                serving.append(version)
        else:
            load.append(version)
    retire = sorted(set(view.serving) - set(serving) - set(load), reverse=True)
    return Plan(tuple(load), tuple(serving), tuple(waiting), tuple(retire))
