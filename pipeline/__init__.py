"""The crystal pipeline: what the command line runs, as functions a script can call too.

`pipeline.config` holds the run, reward, sampling and evaluation configs and the preset loader;
`pipeline.runs` turns MP-20 data into prompts and pairs and runs SFT, GRPO and sampling over the domain-free
`grpo` package with a `rewards` callable; `pipeline.demo` chains them into the resumable demo. Errors meant for
a user are `PipelineError` (one line, no traceback).
"""
