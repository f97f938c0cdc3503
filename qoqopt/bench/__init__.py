"""`qoqopt bench`: every build's drift against the original and its speed, each in its own runtime.

- variants.py  parse `--variants`, find builds in export directories or build them with `qoqopt export`
- given_gguf.py  a GGUF named by its file (another tool's): its parts, its mmproj, its dims checked
- eval_set.py  the clinical chats every variant is measured on, and the stored reference logits
- machine.py   hardware / software tags for the result file
- hf_runner.py transformers runtime (bf16/fp16/fp32, bitsandbytes, qoqopt's W4A16 for GPTQ/AWQ)
- gguf_runner.py llama.cpp runtime (text GGUF + mmproj through mtmd)
- speed.py     warm-up, repeats and medians
- worker.py    one variant in one child process (clean peak memory; a crash fails only that variant)
- run.py       orchestration and the result JSON (schema qoqopt.bench/1, read by `qoqopt report`)
"""
