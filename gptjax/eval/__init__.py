"""Few-shot evaluation of gptjax checkpoints (GPT-3 paper section 2.4).

  example.py          Example: one item as one of four request kinds (mc, loglik, rolling, generate)
  loaders.py          each task file format -> Examples
  definitions.py      user tasks defined as data (JSON/YAML templates over a file's fields)
  tasks.py            the table of built-in tasks; resolve_task (--task NAME=PATH -> Task)
  benchmarks_mc.py    RACE, ANLI, SuperGLUE WiC / WSC / MultiRC / ReCoRD from their releases
  fewshot.py          seeded K-shot contexts, fitted to n_ctx
  scoring.py          jitted, bucketed, sharded loglikelihood / rolling / greedy scoring
  generation.py       free-form answers: stop tokens, answer matching (EM, F1, BLEU)
  synthetic.py        the GPT-3 paper's arithmetic and word-scrambling tasks, Table 3.9/3.10
  qa.py               closed-book QA, reading comprehension and translation loaders
  metrics.py          acc, acc_norm, stderr, perplexities, bits per byte, EM / F1
  harness.py          tasks x shots -> results JSON, table, PNG, samples log
  in_training.py      train.eval_tasks: the tasks scored on the training parameters
  lm_eval_adapter.py  the "gptjax" model for lm-evaluation-harness (imports lm_eval)

`gptjax eval ...` is gptjax.cli's `eval` command. Importing this package imports neither torch,
transformers nor lm_eval (nor jax: everything heavy is imported when used).
"""
