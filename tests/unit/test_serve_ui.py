"""The chat page's logic without a browser: what reply_stream sends the engine, the settings it starts from,
and `app_ui_main(infer_args)` taking the spec's InferArguments."""

from types import SimpleNamespace

from martlet.args.infer import InferArguments
from martlet.args.serve import AppUIArguments
from martlet.infer.generation import GenConfig
from martlet.infer.protocol import Delta
from martlet.ui.app import _arguments
from martlet.ui.chat import Settings, reply_stream


class FakeEngine:
    def __init__(self, system=None, generation_config=None):
        self.template = SimpleNamespace(system=system)
        self.defaults = GenConfig(**vars(generation_config or SimpleNamespace()))  # the model's generation config
        self.calls = []
        self.closed = False

    def model_defaults(self):
        return self.defaults

    def stream(self, prompts, config):
        (messages,) = prompts
        self.calls.append((messages, config))
        try:
            yield from [Delta(0, "Hel"), Delta(0, "lo"), Delta(0, "!")]
        finally:
            self.closed = True


def test_reply_stream_grows_the_reply_and_sends_history_system_and_settings():
    engine = FakeEngine()
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    settings = Settings("Be kind.", 7, 0.0, 0.5)
    assert list(reply_stream(engine, history, "c", settings, GenConfig(repetition_penalty=1.1))) == \
        ["Hel", "Hello", "Hello!"]
    messages, config = engine.calls[0]
    assert messages == [{"role": "system", "content": "Be kind."}, *history, {"role": "user", "content": "c"}]
    assert (config.max_new_tokens, config.temperature, config.do_sample, config.top_p,
            config.repetition_penalty) == (7, 0.0, False, 0.5, 1.1)
    list(reply_stream(engine, [], "d", Settings("  ", 5, 0.7, 1.0)))
    messages, config = engine.calls[1]
    assert messages == [{"role": "user", "content": "d"}] and config.do_sample is True  # empty: template default


def test_stopping_the_page_closes_the_engine_stream():
    engine = FakeEngine()
    replies = reply_stream(engine, [], "x", Settings("", 5, 0.0, 1.0))
    next(replies)
    replies.close()
    assert engine.closed


def test_settings_start_from_the_arguments_then_the_model():
    sampling = SimpleNamespace(do_sample=True, temperature=0.6, top_p=0.9)
    assert Settings.initial(FakeEngine("sys", sampling), GenConfig()) == Settings("sys", 512, 0.6, 0.9)
    assert Settings.initial(FakeEngine(None, SimpleNamespace(do_sample=False)), GenConfig()) == \
        Settings("", 512, 0.0, 1.0)
    assert Settings.initial(FakeEngine(None, sampling), GenConfig(temperature=0, max_new_tokens=64, top_p=0.5)) == \
        Settings("", 64, 0.0, 0.5)


def test_app_ui_main_takes_the_specs_infer_arguments():
    args = _arguments(InferArguments(ckpt_dir="some/ckpt", load_dataset_config=True, temperature=0.3))
    assert isinstance(args, AppUIArguments)
    assert (args.ckpt_dir, args.temperature, args.server_name, args.server_port) == ("some/ckpt", 0.3, "127.0.0.1",
                                                                                      None)
    assert _arguments(["--port", "7999", "--model", "m"]).server_port == 7999
