"""The CPU demo's ingredients: a synthetic verifiable math task, its tokenizer, a tiny Qwen3 and the
supervised warm start that gives RL a partially-correct starting point.

    from megafork.demo.task import ArithmeticTask
    from megafork.demo.model import create_demo_model
    from megafork.demo.sft import SFTConfig, warm_start
"""
