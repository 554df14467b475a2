"""Helper process for test_sampler_seed: load the configured model at a given moment, then print
one sampled reply and the seconds the load spanned. Usage: python -m tests.seed_probe START_EPOCH"""

from __future__ import annotations

import json
import sys
import time

from api.config import load_settings
from api.runtime import ModelHost
from api.sampling import SamplingParams


def main() -> None:
    start = float(sys.argv[1])
    while time.time() < start:
        time.sleep(0.001)
    models = ModelHost(load_settings())
    models.load_default_models()
    chat = models.chat_model(None)
    prompt = chat.template.render([{"role": "user", "content": "Say something surprising."}])
    pieces: list[str] = []
    chat.acquire(10)
    try:
        chat.generate(prompt, SamplingParams(max_tokens=16, temperature=1.5, top_k=0, top_p=1.0),
                      lambda text: pieces.append(text) or True)
    finally:
        chat.release()
    print(json.dumps({"text": "".join(pieces), "seconds": [int(t) for t in chat.loaded_between]}))


if __name__ == "__main__":
    main()
