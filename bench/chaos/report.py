"""Turning rows, audit tables, simulator counters and logs into the chaos report (JSON and a table).

Definitions (docs/chaos.md says the same in prose):

* accepted: submissions that got a 202 (after retries with the same Idempotency-Key); rejected: the others.
* lost: accepted query ids whose row is not completed/failed/cancelled at the drain deadline, or missing.
* terminal rows written twice: rows of `chaos_terminal_rewrites` (any UPDATE of a terminal row) plus ids
  that entered a terminal state more than once in `chaos_transitions`; counted per query id.
* extra LLM calls: for each accepted id, simulator calls carrying its X-AIQ-Query-Id minus the attempts
  whose outcome the attempt's own worker wrote (completed, failed, or retry scheduled); i.e. calls whose
  answer never reached the row. Each attempt in flight in a killed process may cost one such call, so
  they are reported next to `kills` and `attempts_abandoned_by_kills`.
* drain: seconds from "faults stopped" (window over, every server and worker back) until the last
  accepted query was seen terminal.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.chaos.audit import TERMINAL, Transition
from devkit.paths import ROOT
from devkit.procs import START_MARK

if TYPE_CHECKING:
    from bench.chaos.harness import ChaosRun, KillRecord

# Failures the issue accepts: the provider's quota, or attempts used up (by the LLM or by lost workers).
EXPECTED_FAILURES = frozenset({"upstream_quota_exceeded", "upstream_retries_exhausted", "worker_lost"})
MAX_LISTED = 50


def build(
    run: ChaosRun,
    data: dict[str, Any],
    sim_stats: dict[str, Any],
    stopped_at: float,
    drained_at: float | None,
    logs: dict[str, Any],
) -> dict[str, Any]:
    c = run.config
    rows: dict[str, dict[str, Any]] = data["rows"]
    transitions: list[Transition] = data["transitions"]
    calls: dict[str, int] = sim_stats.get("calls_by_query", {})
    accepted_subs = [s for s in run.submissions if s.query_id]
    accepted = [s.query_id for s in accepted_subs if s.query_id]
    accepted_set = set(accepted)
    by_query: dict[str, list[Transition]] = defaultdict(list)
    for tr in transitions:
        by_query[tr.query_id].append(tr)

    # ---- outcome of every accepted query
    status_counts: Counter[str] = Counter()
    failed_reasons: Counter[str] = Counter()
    lost: list[dict[str, Any]] = []
    completed_without_response = []
    for qid in accepted:
        row = rows.get(qid)
        if row is None:
            lost.append({"query_id": qid, "status": "MISSING ROW"})
            continue
        status_counts[row["status"]] += 1
        if row["status"] == "failed":
            failed_reasons[row["error_code"] or "-"] += 1
        if row["status"] == "completed" and not row["has_response"]:
            completed_without_response.append(qid)
        if row["status"] not in TERMINAL:
            lost.append(_lost_detail(qid, row, by_query[qid], calls.get(qid, 0), run.t0))
    took = {
        q: (row["finished_at"] or row["updated_at"]) - row["created_at"]
        for q in accepted
        if (row := rows.get(q)) is not None and row["status"] in TERMINAL and row["created_at"] is not None
    }
    durations = sorted(took.values())
    slowest = [
        {
            "query_id": q,
            "seconds": round(took[q], 2),
            "created_t": round(rows[q]["created_at"] - run.t0, 2),
            "status": rows[q]["status"],
            "llm_calls": calls.get(q, 0),
            "history": _history(by_query[q], run.t0),
        }
        for q in sorted(took, key=took.__getitem__, reverse=True)[:5]
    ]
    over_attempts = [q for q in accepted if q in rows and rows[q]["attempts"] > c.max_attempts]
    unexpected_failures = {k: v for k, v in failed_reasons.items() if k not in EXPECTED_FAILURES}

    # ---- terminal rows written twice
    doubles = terminal_double_writes(data["rewrites"], transitions)

    # ---- attempts, kills and LLM calls
    acct = kill_accounting(by_query, run.kills)
    reclaims_live = acct["reclaims_from_live_workers"]
    abandoned = acct["abandoned"]
    owner_outcomes: Counter[str] = Counter(
        t.query_id for t in transitions if t.old_status == "running" and t.new_status != "running" and not t.is_reclaim
    )
    attempts_total = sum(rows[q]["attempts"] for q in accepted if q in rows)
    calls_accepted = sum(calls.get(q, 0) for q in accepted)
    extra_calls = sum(max(0, calls.get(q, 0) - owner_outcomes.get(q, 0)) for q in accepted)
    calls_beyond_attempts = {
        q: calls.get(q, 0) - rows[q]["attempts"]
        for q in accepted
        if q in rows and calls.get(q, 0) > rows[q]["attempts"]
    }
    worker_kills = run.counters["worker_kill"]
    child_kills = run.counters["child_kill"]
    kills = worker_kills + child_kills

    # ---- load
    rejected = [s for s in run.submissions if not s.query_id]
    submit_errors: Counter[str] = Counter(e for s in run.submissions for e in s.errors)
    dup_ids = [q for q, n in Counter(accepted).items() if n > 1]
    orphans = sorted(set(rows) - accepted_set)  # only the harness writes queries in this database
    orphan_states = Counter(rows[q]["status"] for q in orphans)

    drain_s = round(drained_at - stopped_at, 2) if drained_at is not None else None
    last_finish = max((rows[q]["updated_at"] or 0.0 for q in accepted if q in rows), default=None)

    checks = {
        "accepted_positive": len(accepted) > 0,
        "lost_zero": not lost,
        "no_double_terminal_writes": not doubles["ids"],
        "drain_within_bound": drain_s is not None and drain_s <= c.drain_bound,
        # Goals of the issue reported but not gating the exit status:
        "failed_only_expected_reasons": not unexpected_failures,
        "extra_llm_calls_le_kills": extra_calls <= kills,
        "extra_llm_calls_le_abandoned_attempts": extra_calls <= len(abandoned),
        "no_llm_call_beyond_attempts": not calls_beyond_attempts,
        "no_orphan_rows": not orphans,
        "no_deleted_rows": not data["deleted"],
        "attempts_within_max": not over_attempts,
    }
    gating = ("accepted_positive", "lost_zero", "no_double_terminal_writes", "drain_within_bound")

    return {
        "run": {
            "run_id": run.run_id,
            "mode": c.mode,
            "seed": c.seed,
            "started_at": round(run.t0, 3),
            "config": c.public(),
            "code": {
                **_code_version(),
                "digest_at_start": run.code_digest_start,
                "digest_at_end": run.code_digest_end,
                # Workers restarted during the run load whatever is on disk: a change mixes code versions.
                "changed_during_run": run.code_digest_start != run.code_digest_end,
            },
        },
        "load": {
            "requested": c.queries,
            "submitted": len(run.submissions),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "rejected_last_error": dict(Counter(s.errors[-1] if s.errors else "-" for s in rejected)),
            "submit_http_errors_retried": dict(submit_errors),
            "accepted_after_retry": sum(1 for s in accepted_subs if s.http_attempts > 1),
            "idempotent_replays": sum(1 for s in accepted_subs if s.replayed),
            "duplicate_accepted_ids": dup_ids,
            "orphan_rows": len(orphans),
            "orphan_row_states": dict(orphan_states),
            "orphan_examples": orphans[:10],
        },
        "outcome": {
            "completed": status_counts["completed"],
            "failed": status_counts["failed"],
            "cancelled": status_counts["cancelled"],
            "failed_by_reason": dict(failed_reasons),
            "unexpected_failed_reasons": unexpected_failures,
            "completed_without_response": completed_without_response[:MAX_LISTED],
            "seconds_to_terminal": _percentiles(durations),
            "slowest": slowest,
            "attempts_histogram": dict(sorted(Counter(rows[q]["attempts"] for q in accepted if q in rows).items())),
            "rows_over_max_attempts": over_attempts[:MAX_LISTED],
            "lost": len(lost),
            "lost_by_state": dict(Counter(x["status"] for x in lost)),
            "lost_rows": lost[:MAX_LISTED],
        },
        "double_terminal_writes": {
            "total": len(doubles["ids"]),
            "terminal_rewrite_events": len(data["rewrites"]),
            "ids_rewritten_after_terminal": len(doubles["rewritten"]),
            "ids_entering_terminal_more_than_once": len(doubles["multi_terminal"]),
            "examples": data["rewrites"][:20],
            "multi_terminal_examples": {q: _history(by_query[q], run.t0) for q in list(doubles["multi_terminal"])[:10]},
            "deleted_rows": data["deleted"][:MAX_LISTED],
        },
        "llm": {
            "calls_total": sim_stats.get("total_calls"),
            "calls_for_accepted": calls_accepted,
            "attempts_total": attempts_total,
            "owner_written_outcomes": sum(owner_outcomes[q] for q in accepted),
            "extra_llm_calls": extra_calls,
            "kills": kills,
            "attempts_abandoned_by_kills": len(abandoned),
            "calls_beyond_attempts": sum(calls_beyond_attempts.values()),
            "calls_beyond_attempts_examples": dict(list(calls_beyond_attempts.items())[:10]),
            "attempts_without_call": sum(max(0, rows[q]["attempts"] - calls.get(q, 0)) for q in accepted if q in rows),
            "reclaims": acct["reclaims"],
            "reclaims_after_kill": acct["reclaims_after_kill"],
            "reclaims_from_live_workers": len(reclaims_live),
            "reclaims_from_live_workers_examples": [
                {"reclaim": _tr(t, run.t0), "history": _history(by_query[t.query_id], run.t0)}
                for t in reclaims_live[:10]
            ],
            "simulator_faults": sim_stats.get("faults", {}),
            "simulator_max_in_flight": sim_stats.get("max_in_flight"),
        },
        "faults": {
            "child_kills": child_kills,
            "worker_kills": worker_kills,
            "child_kills_substituted_by_worker_kills": run.counters["child_kills_substituted_by_worker_kills"],
            "broker": c.broker,
            "redis_restarts": run.counters["redis_down"],
            "rabbitmq_restarts": run.counters["rabbitmq_down"],
            "pg_restarts": run.counters["pg_down"],
            "unexpected_exits": {
                k: run.counters[k]
                for k in ("worker_exited_unexpectedly", "api_exited_unexpectedly", "simulator_exited_unexpectedly")
            },
            "fault_errors": [e for e in run.events if e["kind"] == "fault_error"],
            "events": run.events,
        },
        "drain": {
            "faults_stopped_at_s": round(stopped_at - run.t0, 2),
            "drain_seconds": drain_s,
            "bound_seconds": c.drain_bound,
            "deadline_seconds": c.drain_timeout,
            "within_bound": checks["drain_within_bound"],
            "last_accepted_row_update_after_stop_s": round(last_finish - stopped_at, 2) if last_finish else None,
        },
        "timeline": run.timeline,
        "logs": logs,
        "checks": checks,
        "gating_checks": list(gating),
        "ok": all(checks[k] for k in gating),
    }


def _code_version() -> dict[str, Any]:
    """Which code was under test: commit, uncommitted files, and the versions that matter for recovery."""
    info: dict[str, Any] = {}
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout
        info["uncommitted_files"] = len(status.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    for dist in ("celery", "kombu", "redis", "sqlalchemy", "asyncpg", "openai"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None

    def pick(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 2)

    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": round(values[-1], 2)}


def terminal_double_writes(rewrites: list[dict[str, Any]], transitions: list[Transition]) -> dict[str, Any]:
    """Ids written after they were terminal (trigger rows) or that entered a terminal state twice."""
    rewritten = Counter(r["query_id"] for r in rewrites)
    entries = Counter(t.query_id for t in transitions if t.new_status in TERMINAL and t.old_status not in TERMINAL)
    multi = {q: n for q, n in entries.items() if n > 1}
    return {"ids": set(rewritten) | set(multi), "rewritten": dict(rewritten), "multi_terminal": multi}


def kill_accounting(by_query: dict[str, list[Transition]], kills: list[KillRecord]) -> dict[str, Any]:
    """Which attempts died with a SIGKILLed process, and which reclaims were (not) explained by a kill.

    A pid can be reused within a long run, so a claim belongs to the killed process only if it was made
    between that process's start and its kill.
    """
    abandoned: list[tuple[str, int]] = []
    reclaims = after_kill = 0
    live: list[Transition] = []
    for qid, trs in by_query.items():
        for i, tr in enumerate(trs):
            if tr.new_status == "running":
                killed_at = _killed_at(owner_pid(tr.new_lease_owner), tr.at, kills)
                if killed_at is None:
                    continue
                end = next(
                    (e for e in trs[i + 1 :] if e.old_status == "running" and e.old_attempts == tr.new_attempts),
                    None,
                )
                if end is None or end.at > killed_at:
                    abandoned.append((qid, tr.new_attempts))
            elif tr.is_reclaim:
                reclaims += 1
                claim = next(
                    (c for c in reversed(trs[:i]) if c.new_status == "running" and c.new_attempts == tr.old_attempts),
                    None,
                )
                killed_at = _killed_at(owner_pid(tr.old_lease_owner), claim.at, kills) if claim else None
                if killed_at is not None and killed_at <= tr.at:
                    after_kill += 1
                else:
                    live.append(tr)
    return {
        "abandoned": abandoned,
        "reclaims": reclaims,
        "reclaims_after_kill": after_kill,
        "reclaims_from_live_workers": live,
    }


def _killed_at(pid: int | None, claim_at: float, kills: list[KillRecord]) -> float | None:
    """Kill time of the process `pid` that was alive at `claim_at`, if the harness killed it."""
    if pid is None:
        return None
    for k in kills:
        if k.pid == pid and k.started_at <= claim_at <= k.killed_at:
            return k.killed_at
    return None


def owner_pid(owner: str | None) -> int | None:
    """The pid in a `lease_owner` (`host:pid`), if any."""
    if not owner:
        return None
    tail = owner.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _tr(t: Transition, t0: float) -> dict[str, Any]:
    return {
        "query_id": t.query_id,
        "t": round(t.at - t0, 2),
        "from": f"{t.old_status}#{t.old_attempts}",
        "to": f"{t.new_status}#{t.new_attempts}",
        "old_owner": t.old_lease_owner,
        "new_owner": t.new_lease_owner,
        "lease_expired_s_before": round(t.txn_at - t.old_lease_expires_at, 2) if t.old_lease_expires_at else None,
        "error_code": t.new_error_code,
        "reclaim": t.is_reclaim,
    }


def _history(trs: list[Transition], t0: float) -> list[dict[str, Any]]:
    return [_tr(t, t0) for t in trs]


def _lost_detail(qid: str, row: dict[str, Any], trs: list[Transition], calls: int, t0: float) -> dict[str, Any]:
    def rel(v: float | None) -> float | None:
        return round(v - t0, 2) if v is not None else None

    return {
        "query_id": qid,
        "status": row["status"],
        "attempts": row["attempts"],
        "error_code": row["error_code"],
        "lease_owner": row["lease_owner"],
        "lease_expires_t": rel(row["lease_expires_at"]),
        "next_attempt_t": rel(row["next_attempt_at"]),
        "updated_t": rel(row["updated_at"]),
        "created_t": rel(row["created_at"]),
        "llm_calls": calls,
        "history": _history(trs, t0),
    }


# ---------------------------------------------------------------------------------------------- logs

_LEVELS = ("warning", "error", "critical")
_PLAIN_BAD = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\bFATAL\b|\bPANIC\b|Exception", re.IGNORECASE)


def _restarts_text(faults: dict[str, Any]) -> str:
    broker = faults.get("broker", "redis")
    return f"{broker} {faults.get(f'{broker}_restarts', 0)} / {faults['pg_restarts']}"


def scan_logs(log_dir: Path, *extra: Path | None) -> dict[str, Any]:
    """Warnings and errors of every process, grouped by message; plain-text oddities sampled."""
    grouped: Counter[tuple[str, str, str, str]] = Counter()
    plain: Counter[tuple[str, str]] = Counter()
    tracebacks = 0
    files = sorted(log_dir.glob("*.log")) + [p for p in extra if p is not None and p.exists()]
    for path in files:
        name = re.sub(r"-\d+\.log$", ".log", path.name)
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(START_MARK):
                continue
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if isinstance(entry, dict):
                    level = str(entry.get("level", "")).lower()
                    if level in _LEVELS:
                        detail = str(entry.get("error") or entry.get("exc_type") or entry.get("code") or "")
                        msg = _UUID.sub("<uuid>", str(entry.get("msg", "")))[:160]
                        grouped[(name, level, msg, detail)] += 1
                    continue
            if "Traceback" in line:
                tracebacks += 1
            if _PLAIN_BAD.search(line):
                plain[(name, _normalise(line)[:200])] += 1
    return {
        "grouped": [
            {"file": f, "level": lvl, "msg": msg, "detail": det, "count": n}
            for (f, lvl, msg, det), n in grouped.most_common(60)
        ],
        "plain_text": [{"file": f, "line": ln, "count": n} for (f, ln), n in plain.most_common(40)],
        "tracebacks": tracebacks,
    }


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _normalise(line: str) -> str:
    # Group lines that differ only by timestamps, ids, pids and numbers.
    line = _UUID.sub("<uuid>", line)
    line = re.sub(r"\d{4}-\d\d-\d\d[ T][\d:.,]+(\s*UTC)?", "<ts>", line)
    return re.sub(r"\d+", "N", line)


# ---------------------------------------------------------------------------------------------- table


def format_table(rep: dict[str, Any]) -> str:
    load, out, dbl, llm, faults, drain = (
        rep["load"],
        rep["outcome"],
        rep["double_terminal_writes"],
        rep["llm"],
        rep["faults"],
        rep["drain"],
    )
    cfg = rep["run"]["config"]
    rows: list[tuple[str, str]] = [
        ("mode / seed", f"{rep['run']['mode']} / {rep['run']['seed']}"),
        ("window", f"{cfg['duration']:g} s, {cfg['workers']} workers x {cfg['concurrency']}"),
        ("queries requested", str(load["requested"])),
        ("accepted (202)", str(load["accepted"])),
        ("  after a retried submit", str(load["accepted_after_retry"])),
        ("rejected", f"{load['rejected']} {load['rejected_last_error'] or ''}".rstrip()),
        ("orphan rows (not acked)", str(load["orphan_rows"])),
        ("completed", str(out["completed"])),
        ("failed", f"{out['failed']} {out['failed_by_reason'] or ''}".rstrip()),
        ("  unexpected reasons", str(out["unexpected_failed_reasons"] or "none")),
        ("cancelled", str(out["cancelled"])),
        ("seconds submit -> terminal", str(out["seconds_to_terminal"])),
        ("LOST (must be 0)", f"{out['lost']} {out['lost_by_state'] or ''}".rstrip()),
        ("TERMINAL WRITTEN TWICE (must be 0)", str(dbl["total"])),
        ("kills (worker / child)", f"{faults['worker_kills']} / {faults['child_kills']}"),
        ("  child kills done as worker kills", str(faults["child_kills_substituted_by_worker_kills"])),
        ("broker restarts / pg restarts", _restarts_text(faults)),
        ("unexpected process exits", str({k: v for k, v in faults["unexpected_exits"].items() if v} or "none")),
        ("LLM calls / attempts", f"{llm['calls_for_accepted']} / {llm['attempts_total']}"),
        ("extra LLM calls", str(llm["extra_llm_calls"])),
        ("  attempts abandoned by kills", str(llm["attempts_abandoned_by_kills"])),
        ("  calls beyond attempts", str(llm["calls_beyond_attempts"])),
        ("  reclaims (after kill / live owner)", f"{llm['reclaims_after_kill']} / {llm['reclaims_from_live_workers']}"),
        ("simulator faults", str({k: v for k, v in llm["simulator_faults"].items() if v})),
        ("drain after faults stopped", _drain_text(drain)),
    ]
    if rep["run"]["code"].get("changed_during_run"):
        rows.insert(0, ("WARNING", "api/worker/shared code changed during the run: restarted workers mixed versions"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "AIQ chaos report", "=" * (width + 40)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("-" * (width + 40))
    for name, ok in rep["checks"].items():
        gate = "gating" if name in rep["gating_checks"] else "goal"
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name} ({gate})")
    lines.append("=" * (width + 40))
    lines.append("RESULT: " + ("OK" if rep["ok"] else "FAILED"))
    return "\n".join(lines)


def _drain_text(drain: dict[str, Any]) -> str:
    if drain["drain_seconds"] is None:
        return f"NOT DRAINED within {drain['deadline_seconds']:g} s (bound {drain['bound_seconds']:g} s)"
    return f"{drain['drain_seconds']:.1f} s (bound {drain['bound_seconds']:g} s)"
