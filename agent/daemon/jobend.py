"""A job's end, as the Agent accounts it (a mixin of resident.Agent): its counters read while the holder still keeps
the cgroup, its outcome (accounting.py's rules) with the GPU's evidence of a CUDA OOM, the job-finished event, the
calibration sample, and the OOM memory (HACKING.md, "CUDA OOMs")."""

import os
import time

from . import accounting, holder, jobrecord, liveness
from .. import journal, oom_memory

NEIGHBOUR_S = 0.5  # a GPU job that ended this shortly before another's exit counts in that one's OOM evidence


class JobEnd:
    def finish(self, pid, wait_status=None, ended=None):
        """Account a job that ended (``ended``: time.time() of its end, when it was seen before now); an end put
        off for a lull (resident.Agent.job_exited) brings its own status and time."""
        job = self.jobs.pop(pid, None)
        if job is None:
            return None
        put_off = self.lull.take(pid)
        if put_off is not None:
            wait_status = put_off[0] if put_off[0] is not None else wait_status
            ended = put_off[1]
        self._close_fds(job)
        job.wait_status = wait_status
        job.final_read()  # the holder still keeps the cgroup: exact peak and OOM count
        if job.holder is not None:
            job.holder.release()
        if job.mode == "GPU":
            after = self._guarded("gpu-after-exit", self._sample_after_exit, job)  # first: the nearest the failure
            job.take_accounted(self._guarded("vram-accounting", self._accounted_peaks, job))
            if after is not None:
                self._guarded("gpu-evidence", self._gpu_evidence, job, after)
            if job.peak_vram_mb:
                self._gpu_exits.append((job.device, time.monotonic(), job.peak_vram_mb))
        fields = job.outcome(ended)
        self._guarded("oom-memory", self._remember, job, fields)
        peaks_known = job.peaks_known(gpu_sampling=self._gpu_sampling())
        # The outcome goes into the job's record before the event: an agent killed between the event and the
        # record's removal leaves a record that says so, and the next agent writes the event only if the journal
        # does not have it yet (recover). Without it the job was accounted twice.
        self._write_record(job, outcome={"fields": {k: v for k, v in fields.items() if k != "INPUT"},
                                         "peaks_known": peaks_known})
        return self._account(job, fields, peaks_known)

    def _account(self, job, fields, peaks_known):
        """The job-finished event, the calibration sample and the metrics of an outcome; then the record goes."""
        status = f"exit {fields['EXIT_STATUS']}" if "EXIT_STATUS" in fields else "exit status unknown"
        ram = f"{fields['PEAK_RAM_MB']} MB" if fields.get("PEAK_RAM_MB") is not None else "not measured"
        vram = ""
        if job.mode == "GPU":
            vram = f", peak VRAM {fields['PEAK_VRAM_MB']} MB" if fields.get("PEAK_VRAM_MB") is not None else \
                ", peak VRAM not measured"
            if fields.get("PREDICTED_VRAM_MB") is not None:
                vram += f" (predicted {fields['PREDICTED_VRAM_MB']} MB)"
        journal.emit("job-finished", f"{job.workload}: job {job.job_id} on {job.mode} finished: {fields['RESULT']} "
                     f"({status}, {fields['DURATION_S']:.1f}s, peak RAM {ram}{vram})", fields,
                     priority=6 if fields["RESULT"] == "success" else 4)
        try:
            accounting.record_sample(self.cfg.agent.state_dir, fields, peaks_known=peaks_known)
        except OSError as exc:
            self.log.warning("cannot record a calibration sample", error=str(exc))
        jobrecord.remove(self.records, job.job_id)
        self.metrics.job_finished(fields)
        return fields

    def recover(self, finishing):
        """Finish what a killed agent was finishing: ``finishing`` holds the records that carry an outcome (the
        agent was killed after it wrote the outcome, before it removed the record). The event goes out only for a
        job whose job-finished the journal does not hold (journal_read.agent_accounted, which first waits until
        journald has stored everything sent before it); its sample and metrics with it. A job whose event is
        there is done: its sample and metrics, if the agent was killed before them, are not written (a lost
        sample costs nothing; a second one would count the job twice). When the journal cannot say (no journald,
        no stored journal), the event goes out: a job is never left unaccounted."""
        from .. import journal_read

        since = min((r.get("started") or 0 for r in finishing.values()), default=0)
        try:
            done = journal_read.agent_accounted(sorted(finishing), since)
        except Exception as exc:  # noqa: BLE001 - a journal that cannot be read: account them all
            self.log.warning("cannot read the journal for the accounts a killed agent was finishing",
                             error=f"{type(exc).__name__}: {exc}")
            done = None
        for job_id, r in finishing.items():
            job = accounting.JobAccount.from_record(r)
            if isinstance(r.get("holder_pid"), int) and r.get("holder_start"):
                holder.Holder(r["holder_pid"], r["holder_start"]).release()  # if the kill came before its end
            if done is not None and job_id in done:
                self.log.info("a killed agent's account of a job is in the journal", job=job_id)
                jobrecord.remove(self.records, job_id)
                continue
            outcome = jobrecord.outcome(r)
            fields = dict(outcome["fields"], INPUT=job.input)
            self.log.info("a killed agent's account of a job is written now", job=job_id,
                          journal="cannot say" if done is None else "has no account")
            self._account(job, fields, outcome.get("peaks_known") is True)

    def _sample_after_exit(self, job):
        """One GPU sample right after a GPU job failed or ended with its status unknown (its GPU entries, or None):
        what the other processes use on its GPU then is the nearest measure of what they used when it failed (a
        short job may have ended between two periodic samples)."""
        if self.monitor is None or job.device is None:
            return None
        base = accounting.classify(job.wait_status, job.oom_kills, job.runtime_max, time.time() - job.started,
                                   job.failcnt)
        if base not in ("failed", "unknown"):
            return None
        self.fresh_sample(0.0)
        return list((self.snapshot or {}).get("gpus", ()))

    def _gpu_evidence(self, job, gpus):
        """Fold the sample after the exit into the job's OOM evidence, with the GPU jobs that failed beside it."""
        now = time.monotonic()
        self._gpu_exits = [x for x in self._gpu_exits if now - x[1] <= NEIGHBOUR_S]
        # GPU jobs that ended on the same GPU just before this one's exit held their memory until they exited (CUDA
        # allocators give it back at exit; a job that failed by running out did so at its peak): gone from the
        # sample after, they were there when this one failed, at most at their peak.
        neighbours = sum(peak for device, _t, peak in self._gpu_exits if device == job.device)
        for other in list(self.jobs.values()):  # ended with it, not accounted yet (the same wake-up): their peaks
            if other.mode == "GPU" and other.device == job.device and not liveness.job_alive(other, zombie_ok=False):
                peaks = self._guarded("vram-accounting", self._accounted_peaks, other)
                neighbours += sum(peaks.values()) if peaks else (other.peak_vram_mb or 0)
        for gpu in gpus:
            job.see_gpu(gpu, after_exit=True, also_mb=neighbours)

    def _remember(self, job, fields):
        """The input of a GPU attempt that ran out of memory goes into the OOM memory (its identity as the agent
        verified it at the grant): ``oom`` for any cuda-oom (outgrew, or squeezed: a job squeezed out early by
        another's growth may itself not fit either, and its failure says nothing of its size, so its retry goes
        where on_gpu_oom says, never blindly to the GPU again), ``suspect`` when the exit status is unknown but
        the GPU was full while it ran (a retry within oom_memory.RETRY_WINDOW_S confirms it)."""
        if job.mode != "GPU" or job.input_id is None:
            return
        result = fields["RESULT"]
        if result == "cuda-oom":
            kind = "oom"
        elif result == "unknown" and accounting.gpu_was_full(job.peak_vram_mb, job.gpu_total_mb, job.others_mb):
            kind = "suspect"
        else:
            return
        self.oom.mark(job.input_id, kind, time.time(), job.workload, job.peak_vram_mb,
                      accounting.oom_need_mb(job.peak_vram_mb, job.gpu_total_mb), job.device, job.job_id,
                      job.gpu_total_mb, os.fsdecode(job.input) if job.input else None)
        fields["OOM_MEMORY"] = kind
        self.log.info("input remembered as out of GPU memory", job=job.job_id, kind=kind,
                      peak_vram_mb=job.peak_vram_mb, total_mb=job.gpu_total_mb, others_mb=job.others_mb)

    def _retried(self, job):
        """A retry of a suspect's input within the window: the sign that the GPU attempt failed. The suspect
        becomes an ``oom`` (the wrapper already routed this retry as after an OOM)."""
        entry = self.oom.get(job.input_id) if job.input_id is not None else None
        if entry is None or oom_memory.applies(entry, time.time()) != "suspect":
            return
        self.oom.mark(job.input_id, "oom", entry[1], *entry[2:], input_name=self.oom.inputs.get(job.input_id))
        self.log.info("a suspected CUDA OOM confirmed by the caller's retry", job=job.job_id,
                      retried_after_s=round(time.time() - entry[1], 1))

    def _accounted_peaks(self, job):
        """The driver's per-process peaks of the job's PIDs on its GPU ({pid: MiB}), or None where the backend's
        accounting cannot vouch for them (then the samples' maximum stands)."""
        ask = getattr(getattr(self.monitor, "backend", None), "accounted_peaks", None)
        if ask is None or self.cfg.gpu.accounting == "off":
            return None
        device = int(job.device) if isinstance(job.device, str) and job.device.isdigit() else None
        return ask(job.accounting_pids(), device=device, job_started=job.started, not_before=job.first_start())
