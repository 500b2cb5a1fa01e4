"""The chat template -> Ollama Go template translation: pieces cut from every named template, the Go template
rendered (by a small evaluator of the Go template subset it uses) exactly as the jinja one, Modelfile text."""

import json
import re

import pytest

from martlet.errors import MartletError
from martlet.export.ollama import ChatPieces, chat_pieces, go_template, modelfile_text, verify
from martlet.templates import get_template, template_names

# --- a tiny evaluator of the Go template constructs go_template() writes ------------------------------
_ACTION = re.compile(r'{{\s*((?:"(?:[^"\\]|\\.)*"|[^"])*?)\s*}}', re.S)  # a quoted string may hold }}


def _parse(template):
    tokens, pos = [], 0
    for match in _ACTION.finditer(template):
        if match.start() > pos:
            tokens.append(("text", template[pos:match.start()]))
        tokens.append(("action", match.group(1)))
        pos = match.end()
    if pos < len(template):
        tokens.append(("text", template[pos:]))
    nodes, rest = _block(tokens)
    assert not rest, rest
    return nodes


def _block(tokens):
    """Nodes up to an 'end' / 'else...' (returned unconsumed)."""
    nodes = []
    while tokens:
        kind, value = tokens[0]
        if kind == "action" and (value == "end" or value.startswith("else")):
            return nodes, tokens
        tokens = tokens[1:]
        if kind == "text":
            nodes.append(("text", value))
        elif value.startswith("if "):
            branches, tokens = _if(value[3:], tokens)
            nodes.append(("if", branches))
        elif value.startswith("range "):
            body, tokens = _block(tokens)
            assert tokens[0] == ("action", "end")
            nodes.append(("range", value[6:], body))
            tokens = tokens[1:]
        else:
            nodes.append(("expr", value))
    return nodes, tokens


def _if(condition, tokens):
    branches = []
    while True:
        body, tokens = _block(tokens)
        branches.append((condition, body))
        kind, value = tokens[0]
        tokens = tokens[1:]
        if value == "end":
            return branches, tokens
        condition = value[len("else if "):] if value.startswith("else if ") else "true"


def _value(term, dot, scope):
    if term.startswith('"'):
        return json.loads(term)
    if term == "true":
        return True
    if term == "false":
        return False
    if term.startswith("$."):
        return scope["$"][term[2:]]
    if term.startswith("$"):
        return scope[term]
    if term.startswith("."):
        return dot[term[1:]]
    raise AssertionError(f"unsupported term {term!r}")


def _test(expression, dot, scope):
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expression)
    if words[0] == "eq":
        return _value(words[1], dot, scope) == _value(words[2], dot, scope)
    if words[0] == "and":
        return all(_value(w, dot, scope) for w in words[1:])
    return bool(_value(words[0], dot, scope))


def _run(nodes, dot, scope, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            for condition, body in node[1]:
                if _test(condition, dot, scope):
                    _run(body, dot, scope, out)
                    break
        elif node[0] == "range":
            for item in _value(node[1], dot, scope):
                _run(node[2], item, scope, out)
        elif ":=" in node[1] or "=" in node[1].split()[1:2]:
            name, _, value = node[1].replace(":=", "=").partition("=")
            scope[name.strip()] = _value(value.strip(), dot, scope)
        else:
            out.append(str(_value(node[1], dot, scope)))


def render_go(template, system, messages):
    """What Ollama renders: .System and .Messages (system messages are not in the loop's branches)."""
    data = {"System": system or "", "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    out = []
    _run(_parse(template), data, {"$": data}, out)
    return "".join(out)


# --- tests ---------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And goodbye?"}],
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}],
]
UNTRANSLATABLE = {"chatglm3"}  # its default system prompt is written unlike a given one


def renderer(tokenizer, name):
    template = get_template(name, tokenizer)

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=template.chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


@pytest.mark.parametrize("name", ["tokenizer"] + template_names())
def test_go_template_renders_like_the_chat_template(tokenizer, name):
    render = renderer(tokenizer, name)
    if name in UNTRANSLATABLE:
        with pytest.raises(MartletError):
            verify(chat_pieces(render, tokenizer.bos_token), render)
        return
    pieces = chat_pieces(render, tokenizer.bos_token)
    verify(pieces, render)
    go = go_template(pieces)
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else pieces.default_system
        assert render_go(go, system, messages) == render(messages, True), (name, messages)


def test_chatml_pieces_and_default_system(tokenizer):
    pieces = chat_pieces(renderer(tokenizer, "smollm2"), tokenizer.bos_token)
    assert pieces == ChatPieces(user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n<|im_start|>assistant\n",
                                assistant_prefix="", assistant_suffix="<|im_end|>\n",
                                system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                                system_in_first_user=False,
                                default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                                head="")


def test_system_inside_the_first_user_message(tokenizer):
    pieces = chat_pieces(renderer(tokenizer, "mistral"), tokenizer.bos_token)
    assert pieces.system_in_first_user and pieces.system_suffix == "\n\n"
    assert pieces.head == tokenizer.bos_token and pieces.assistant_prefix == " "
    go = go_template(pieces)
    assert go.startswith(tokenizer.bos_token + "{{ $first := true }}")
    assert "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}" in go


def test_braces_in_the_text_become_go_strings():
    pieces = ChatPieces("{{user}}: ", "\nbot: ", "", "\n", "", "", False, None, "")
    go = go_template(pieces)
    assert '{{ "{{user}}: " }}{{ .Content }}' in go
    assert render_go(go, None, [{"role": "user", "content": "x"}]) == "{{user}}: x\nbot: "


def test_modelfile_text():
    text = modelfile_text("m-q4_0.gguf", "{{ .Prompt }}", "Be nice.", ["<|im_end|>", "<|im_end|>", '"q"'],
                          {"temperature": 0.7})
    assert text.splitlines()[3:] == ["FROM ./m-q4_0.gguf", "", 'TEMPLATE """{{ .Prompt }}"""', "",
                                     'SYSTEM """Be nice."""', "", 'PARAMETER stop "<|im_end|>"',
                                     'PARAMETER stop "\\"q\\""', "PARAMETER temperature 0.7"]
    fallback = modelfile_text("m.gguf", None, None, [], {}, note="no luck")
    assert "TEMPLATE" not in fallback.replace("# No TEMPLATE", "") and "# No TEMPLATE: no luck" in fallback
    with pytest.raises(MartletError, match='contains """'):
        modelfile_text("m.gguf", None, 'say """hi"""', [], {})
