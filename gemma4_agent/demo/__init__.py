"""The embedded demo model: a tiny Gemma 4 Unified trained on the synthetic world (see docs/DEMO.md).

`tokenizer` builds its small byte-level BPE tokenizer, `actions_text` writes the canonical action text,
`data` turns expert episodes into training examples, `train` is `gemma4-agent train-demo`,
`evaluate` measures it against the expert (per frame and closed loop).
"""
