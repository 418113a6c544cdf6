"""The second set of benchmarks/mutation_check.py: one-line bugs in training and infrastructure
(the step, schedule, loop, plan, checkpoints, run folder, sharded checkpoints, evaluation, data
cache, files, sampling text, the CLI, compare and bench measurements), each a slip a reviewer could
miss. `python benchmarks/mutation_check.py --set infra` runs them."""
from __future__ import annotations


def mutations(M):
    STEP, SCHED, LOOP = "llmlab/training/step.py", "llmlab/training/schedule.py", "llmlab/training/loop.py"
    PLAN, CKPTS, RUNDIR = "llmlab/training/plan.py", "llmlab/training/checkpoints.py", "llmlab/training/rundir.py"
    DCP, LEGACY, EVAL = "llmlab/training/dcp.py", "llmlab/training/dcp_legacy.py", "llmlab/training/evaluate.py"
    ARGS = "llmlab/training/args.py"
    T_INFRA = "tests/test_infrastructure.py"
    T_HARD = "tests/test_hardening.py"
    T_SEC = "tests/test_sharded_security.py"
    T_MATH = ("tests/test_train_math.py",)
    T_RESUME = ("tests/test_train.py", "-k", "resume_equals")
    return [
        # ---- the step and the schedule -----------------------------------------------------------
        M("accum_scale_lost", STEP, "loss = self._loss(x, y) / accum", "loss = self._loss(x, y)",
          (T_INFRA, "-k", "batch_threads"), "each micro-batch's loss not divided by grad_accum"),
        M("shard_accum_scale_lost", STEP, "scale=1.0 / accum", "scale=1.0", (T_INFRA, "-k", "batch_threads"),
          "batch shards add whole gradients per micro-batch"),
        M("clip_never", STEP, "if self.cfg.grad_clip > 0:", "if self.cfg.grad_clip < 0:", T_MATH,
          "gradient clipping never applied"),
        M("nan_step_applied", STEP, "if math.isfinite(loss_sum):", "if loss_sum == loss_sum or True:",
          (T_INFRA, "-k", "non_finite"), "a NaN step still updates the weights"),
        M("grads_never_zeroed", STEP, "self.opt.zero_grad(set_to_none=True)", "self.opt.zero_grad(set_to_none=True) if False else None",
          T_MATH, "gradients accumulate across optimizer steps"),
        M("warmup_off_by_one", SCHED, "return self.lr * (step + 1) / (self.warmup_iters + 1)",
          "return self.lr * step / (self.warmup_iters + 1)", T_MATH, "warmup starts at lr 0"),
        M("after_decay_lr", SCHED, "            return self.min_lr\n", "            return self.lr\n",
          ("tests/test_train_settings.py", "-k", "min_lr_zero"), "past lr_decay_iters the lr jumps back to lr"),
        M("min_lr_zero_is_default", SCHED, "a.lr / 10 if a.min_lr is None else a.min_lr",
          "a.lr / 10 if not a.min_lr else a.min_lr", ("tests/test_train_settings.py", "-k", "min_lr_zero"),
          "an explicit --min-lr 0 becomes lr / 10"),
        M("beta1_zero_refused", ARGS, "(0 <= self.beta1 < 1,", "(0 < self.beta1 < 1,",
          ("tests/test_train_settings.py", "-k", "min_lr_zero"), "--beta1 0 refused"),
        M("lr_inf_accepted", ARGS, "(self.lr > 0 and math.isfinite(self.lr),", "(self.lr > 0,",
          ("tests/test_train_settings.py", "-k", "python_callers"), "lr = inf accepted from Python"),
        # ---- the loop and the plan ---------------------------------------------------------------
        M("tokens_per_s_no_accum", LOOP, "tokens_per_step = rows * blk * a.grad_accum", "tokens_per_step = rows * blk",
          (T_INFRA, "-k", "tokens_per_second"), "tokens/s forgets gradient accumulation"),
        M("step0_eval_skipped", LOOP, "saved_at = step if plan.resume else None", "saved_at = step if plan.resume else 0",
          T_MATH, "a fresh run never evaluates step 0"),
        M("best_forgotten_on_resume", LOOP, "step, best_val = checkpoints.restore(", "step, _ = checkpoints.restore(",
          (T_INFRA, "-k", "best_survives"), "a resume forgets the best val loss: best/ overwritten by worse"),
        M("given_settings_ignored_on_resume", PLAN,
          'merged = values | {k: v for k, v in train.items() if k not in given and k not in ("out", "resume")}',
          'merged = values | {k: v for k, v in train.items() if k not in ("out", "resume")}',
          ("tests/test_train_recovery.py", "-k", "schedule"), "flags given with --resume lose to the saved ones"),
        M("global_batch_not_split", PLAN, 'merged["batch_size"] = rows // world', 'merged["batch_size"] = rows',
          (T_HARD, "-k", "ranks"), "a resume on more ranks multiplies the global batch"),
        M("lr_decay_not_saved", PLAN, 'values["lr_decay_iters"] = values["max_iters"]', 'values["lr_decay_iters"] = None',
          ("tests/test_train_recovery.py", "-k", "schedule"), "extending a run stretches its cosine"),
        M("data_saved_relative", PLAN, "return str(Path(data).expanduser().absolute())", "return str(data)",
          (T_HARD, "-k", "data_is_saved"), "a relative --data saved as typed"),
        # ---- checkpoints and the run folder ------------------------------------------------------
        M("best_never_written", CKPTS, "        if val_loss < best_val:\n            ckpt.save_checkpoint",
          "        if val_loss > best_val:\n            ckpt.save_checkpoint", (T_INFRA, "-k", "best_survives"),
          "best/ never written in a single-process run"),
        M("metrics_duplicate_after_resume", CKPTS, 'else rec["step"] < step  # a resume', 'else rec["step"] <= step  # a resume',
          (T_INFRA, "-k", "crash_and_resume"), "a resume keeps the crashed run's train line of its step and logs it again"),
        M("rng_not_restored", CKPTS, 'torch.set_rng_state(tensors["rng.torch"].cpu())', "None", T_RESUME,
          "dropout's RNG not restored on resume"),
        M("sampler_not_restored", CKPTS,
          'sampler.load_state_dict({k[len("sampler."):]: v for k, v in tensors.items() if k.startswith("sampler.")})',
          "None", T_RESUME, "the data order restarts on resume"),
        M("old_last_not_recovered", RUNDIR, "            os.replace(old, target)\n", "            pass\n",
          ("tests/test_train_recovery.py", "-k", "renames"), ".last.old left where last/ should be"),
        # ---- sharded checkpoints -----------------------------------------------------------------
        M("gather_draws_from_the_rng", DCP, "with torch.random.fork_rng(devices=[]):", "if True:",
          (T_INFRA, "-k", "sharded_run_with_dropout"), "rank 0's best/ write draws from the RNG dropout uses"),
        M("tied_head_saved_twice", DCP, "return {k: v for k, v in get_model_state_dict(model).items() if k not in tied}",
          "return dict(get_model_state_dict(model))", (T_SEC, "-k", "hold_no_pickle"), "the tied head saved under both names"),
        M("shard_folder_unchecked", DCP, "if f.is_symlink() or not f.is_file() or not SHARD_FILE.fullmatch(f.name):",
          "if False:", (T_SEC, "-k", "foreign_files"), "files llmlab never writes are read"),
        M("shard_keys_unchecked", DCP, "unknown = sorted(set(metadata.state_dict_metadata) - self.allowed)",
          "unknown = []", (T_SEC, "-k", "never_has"), "tensors of another model are accepted"),
        M("legacy_allow_list_by_module", LEGACY, "if (module, name) not in ALLOWED:",
          "if module not in {m for m, _ in ALLOWED}:", (T_SEC, "-k", "planted"),
          "the pickle allow-list checks only the module (a dotted name walks to os.system)"),
        # ---- evaluation, data, files ---------------------------------------------------------------
        M("eval_window_count", EVAL, "n = len(ids) - 1 if max_tokens is None", "n = len(ids) if max_tokens is None",
          (T_INFRA, "-k", "windows"), "evaluation windows counted from every id, not every target"),
        M("eval_mean_unweighted", EVAL, "total += model.loss(x, y).item() * y.numel()",
          "total += model.loss(x, y).item() * x.shape[0]", (T_INFRA, "-k", "windows"),
          "the mean weighs batches by rows, not tokens"),
        M("cache_id_at_vocab_accepted", "llmlab/data.py", "return int(np.memmap(path, dtype=dtype, mode=\"r\").max()) < vocab_size",
          "return int(np.memmap(path, dtype=dtype, mode=\"r\").max()) <= vocab_size", (T_INFRA, "-k", "token_cache"),
          "a cached id equal to the vocabulary size is trusted"),
        M("file_mode_0600", "llmlab/fsutil.py", "        os.chmod(tmp, file_mode())\n", "        pass\n",
          (T_INFRA, "-k", "umask"), "single files keep mkstemp's 0600"),
        M("stream_splits_characters", "llmlab/textstream.py", 'if len(new) > len(prefix) and (final or not new.endswith("\\ufffd")):',
          "if len(new) > len(prefix):", (T_INFRA, "-k", "multibyte"), "streamed text splits a multi-byte character"),
        M("plot_any_suffix", "llmlab/plot.py", 'if path.suffix.lower() != ".png":', "if False:",
          ("tests/test_no_traceback.py", "-k", "not_a_plot"), "plot writes PNG bytes into notes.txt"),
        M("broken_pipe_status", "llmlab/cli.py", "        _silence_stdout()\n        return 0\n",
          "        _silence_stdout()\n        return 1\n", ("tests/test_no_traceback_api.py", "-k", "closed_early"),
          "a reader that closed the pipe early gets a failure status"),
        # ---- measurements ---------------------------------------------------------------------------
        M("peak_memory_unit", "llmlab/compare/worker.py", 'else 2**10)', 'else 2**20)', (T_INFRA, "-k", "peak_memory"),
          "compare's peak memory reported in GiB under a MiB label"),
        M("bench_rate_first_steps", "llmlab/bench/measure.py", '"decode_tokens_per_s": {k: variants[k][1] / median(',
          '"decode_tokens_per_s": {k: variants[first][1] / median(', (T_INFRA, "-k", "no_cache_rate"),
          "every variant's rate divides the first variant's step count"),
    ]
