"""The server tests' one way to start a server: the tiny trained pair with a chat template (its base ships
none), served with the MTP drafter on a free loopback port, closed when the block ends."""

import contextlib
import json
import shutil
import threading
from pathlib import Path

from conftest import TINY_CODE

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
            "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def templated_pair(directory: Path):
    """(model, tokenizer, MTP proposer): the tiny base, copied into `directory` with TEMPLATE as its chat
    template, and its assistant."""
    from mlx_spec import load, load_drafter
    from mlx_spec.proposers import make_proposer

    path = Path(directory) / "base"
    shutil.copytree(TINY_CODE / "base", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load(str(path))
    return model, tokenizer, make_proposer(model, drafter=load_drafter(str(TINY_CODE / "assistant"), model))


@contextlib.contextmanager
def serving(pair, **options):
    """A Server for `pair` on 127.0.0.1 (a free port: `srv.server_port`), model id "tiny", serving in a
    thread until the block ends; `options` are Server's."""
    from mlx_spec.server import Server

    model, tokenizer, proposer = pair
    srv = Server(model, tokenizer, proposer, **{"host": "127.0.0.1", "port": 0, "model_name": "tiny", **options})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.close()
