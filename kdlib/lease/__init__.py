"""A lent GPU in a few calls: data carried in parts, benchmark, budgeted grid, results back.

The lent machine (see README.md beside this file) has no network and our pins don't apply there:
its python3 has torch 2.11, pandas, tqdm, filelock and tensorboard, no papermill or Ray. A call
carries at most 64 MiB of working tree and returns at most 8 files of 16 MiB, and the machine
is given back 30 s after a call. So:

* here, :func:`prepare` packs CIFAR-100 (its pixels as prediction residuals,
  :mod:`~kdlib.lease.pixels`) into compressed parts of at most ``part_mib``, plus the
  fp32 weights that the grid's unfinished runs start from or learn from and the checkpoints of
  runs paused at an earlier lease's end (in the room the parts leave, else calls of their own:
  :func:`plan_carry`), under ``.lease/`` (git-ignored), and prints the calls to make;
* there, each call stores what it carries in ``/dev/shm`` (:func:`store`) and checks that the
  earlier calls' files are still there (:func:`check_stash`: a fresh machine lost them); the
  last one also runs :func:`go`: reassemble, decode and check the data, benchmark the device if
  ``results/bench`` has no file for it, train the grid with ``python -m kdlib grid``'s budget
  until the minutes run out, and pack what it added (records, weights, packed models, logs,
  the checkpoints of paused runs) and the benchmark into ``$OUT`` (:func:`pack_outputs`: at
  most 8 files); a follow-up call for the time left trains on there (:func:`restore_returned`);
* here again, :func:`receive` unpacks those files into ``results/gpu`` and ``results/bench``
  (:func:`check_returns`: one machine's returns, each once, in order), and
  :func:`stage_for_next_lease` stages in git the weights and paused checkpoints the next lease
  needs (a later session is a fresh checkout); :func:`prepare` takes them out of the index
  again, so that they travel once rather than with the tree in every call, and hides the other
  presets' results, which the device never reads, from the calls until :func:`receive`
  (:mod:`~kdlib.lease.tracked`: :func:`hide_for_lease`, :func:`unhide_after_lease`).

Every file crossing between the machines is checked against a sha256 written beside it.

Modules: :mod:`~kdlib.lease.transfer` (names, limits, checked parts), :mod:`~kdlib.lease.prepare`
(here, before), :mod:`~kdlib.lease.tracked` (what git tracks, so what every call
sends), :mod:`~kdlib.lease.pixels` (the data's coding), :mod:`~kdlib.lease.device` (there),
:mod:`~kdlib.lease.decisions` (what the benchmark decides), :mod:`~kdlib.lease.receive` (here,
after).
"""
from kdlib.lease.decisions import (BENCH_ALLOWANCE_S, DEVICE_BENCH, FALLBACK_BENCH,
                                   SPARE_COMPILED_S, auto_jobs, compile_undecided, complete_bench,
                                   device_bench_args, groups_weights, later_compile_parts,
                                   missing_parts, replays_steps)
from kdlib.lease.device import (SNAPSHOT, StashIncomplete, assemble_data, call_timeline,
                                check_stash, go, pack, pack_outputs, place_carried,
                                restore_returned, snapshot_results, store, store_carried,
                                store_part)
from kdlib.lease.prepare import (check_something_to_train, compress_carried, frontier_weights,
                                 lost_paused, pack_data, part_mib_for, plan_carry,
                                 planned_paused, prepare, travelling_bytes,
                                 unneeded_committed_weights)
from kdlib.lease.receive import (check_returns, read_manifest, receive, returned_preset,
                                 stage_for_next_lease)
from kdlib.lease.tracked import hide_for_lease, unhide_after_lease, untravelled_results
from kdlib.lease.transfer import (AGAIN_FILE, AGAIN_LEFT, AGAIN_MIN_S, CALLS_FILE,
                                  CARRIED_SUFFIX, DATA_FILES, DATA_MANIFEST, LEASE_DIR, MIB,
                                  OUT_MAX_FILES, STASH, STASH_INCOMPLETE_EXIT, STASH_PLAN,
                                  sha256_of)

__all__ = ["AGAIN_FILE", "AGAIN_LEFT", "AGAIN_MIN_S", "BENCH_ALLOWANCE_S", "CALLS_FILE",
           "CARRIED_SUFFIX", "DATA_FILES", "DATA_MANIFEST", "DEVICE_BENCH", "FALLBACK_BENCH",
           "LEASE_DIR", "MIB", "OUT_MAX_FILES", "SNAPSHOT", "SPARE_COMPILED_S", "STASH",
           "STASH_INCOMPLETE_EXIT", "STASH_PLAN",
           "assemble_data", "auto_jobs", "call_timeline", "check_returns",
           "check_something_to_train", "check_stash",
           "compile_undecided", "complete_bench", "compress_carried", "device_bench_args",
           "frontier_weights", "go", "groups_weights", "hide_for_lease", "later_compile_parts",
           "lost_paused", "missing_parts", "pack", "pack_data", "pack_outputs", "part_mib_for",
           "place_carried", "plan_carry", "planned_paused", "prepare", "read_manifest", "receive",
           "replays_steps", "restore_returned", "returned_preset", "sha256_of", "snapshot_results",
           "stage_for_next_lease", "StashIncomplete", "store", "store_carried", "store_part",
           "travelling_bytes", "unhide_after_lease", "unneeded_committed_weights",
           "untravelled_results"]
