#!/usr/bin/env python3
"""Writes coordinator/testdata/jinja_cases.json: chat templates (written for Strata's tests, in
the styles model repositories use) with contexts, rendered by Python's jinja2 the way Hugging Face
transformers renders chat templates (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loop controls, raise_exception, tojson as json.dumps(ensure_ascii=False)). coordinator/jinja_test
checks that Strata's renderer gives the same text, or fails where jinja2 does.

Run from the repository root with python3-jinja2 installed: python3 tools/jinja_cases.py
"""
import json
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hello there!  "},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Name a prime, ünïcode ok."},
]
NO_SYSTEM = CHAT[1:]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Time now",
                                            "parameters": {"type": "object", "properties": {
                                                "zone": {"type": "string"}}}}}]

CHATML = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

HEADERS = """{{- bos_token }}
{%- for message in messages %}
    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}
    {{- content }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

INST = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}"""

TURNS = """{{ bos_token }}{% set ns = namespace(first_user=true, system='') %}
{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content ~ '\\n\\n' %}{% continue %}{% endif %}
{% set role = 'model' if m.role == 'assistant' else m.role %}
<start_of_turn>{{ role }}
{% if ns.first_user and role == 'user' %}{{ ns.system }}{% set ns.first_user = false %}{% endif %}
{{ m.content | trim }}<end_of_turn>
{% endfor %}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}"""

WITH_TOOLS = """{%- if tools is defined and tools is not none %}
<tools>
{% for tool in tools %}
{{ tool | tojson(indent=4) }}
{% endfor %}
</tools>
{% endif %}
{% for message in messages %}
[{{ message.role | upper }}] {{ message.content }}
{% endfor %}"""

WHITESPACE = """a  {% if true %}  b  {% endif %}  c
    {% if true %}
    d
    {% endif %}
    {%+ if true %}e{% endif %}
  {#- a comment -#}
  f {{- ' g ' -}} h
{% raw %}  {{ not a tag }} {% if %}{% endraw %}
i{# inline #}j
{% for x in [1, 2] -%}
  [{{ x }}]
{%- endfor %}
k"""

EXPRESSIONS = """{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 10 / 5 }} {{ 2 * 3 + 1 }} {{ 1.5 + 1 }}
{{ 'ab' ~ 3 ~ none }} {{ 'x' * 3 }} {{ [1, 2] + [3] }} {{ {'k': 'v', 'n': 1} }}
{{ 'abcdef'[1:4] }} {{ 'abcdef'[::-1] }} {{ 'abcdef'[-2:] }} {{ [1, 2, 3, 4][::2] }} {{ 'héllo'[1] }}
{{ ' a b  c '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ '--x--'.strip('-') }}
{{ 'Hello'.startswith(('He', 'x')) }} {{ 'Hello'.endswith('lo') }} {{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }}
{{ 'a-b-c'.replace('-', '+', 1) }} {{ ', '.join(['x', 'y']) }} {{ 'abc'.upper() }}{{ 'ABC'.lower() }}
{{ 3 in [1, 2, 3] }} {{ 'b' in 'abc' }} {{ 'k' in {'k': 1} }} {{ 4 not in [1] }} {{ not none }} {{ 1 < 2 <= 2 }}
{{ 'yes' if 2 > 1 else 'no' }} {{ 'yes' if false }}| {{ none or 'dflt' }} {{ 0 and 1 }} {{ true and 'last' }}
{{ undefined_name | default('d1') }} {{ '' | default('d2', true) }} {{ none is none }} {{ 3 is odd }} {{ 4 is divisibleby 2 }}
{{ messages | length }} {{ messages | map(attribute='role') | join('/') }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ messages | rejectattr('role', 'eq', 'user') | map(attribute='content') | first }} {{ [3, 1, 3, 2] | unique | list }} {{ [1, 2, 3] | reverse | list }} {{ messages | last | tojson }}
{{ {'b': 2, 'a': [1, 2.5, none, true]} | tojson }} {{ 'q"u\\\\o' | tojson }} {{ [] | tojson }} {{ 'x' | tojson(indent=2) }} {{ 42 | string ~ '!' }} {{ '12' | int + 1 }} {{ -3 | abs }}
{% for k, v in {'one': 1, 'two': 2}.items() %}{{ k }}={{ v }}{{ ',' if not loop.last }}{% endfor %}
{% for x in range(5) if x is even %}{{ loop.index }}/{{ loop.length }}:{{ x }} {% endfor %}
{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x > 4 %}{% break %}{% endif %}{{ x }}{% endfor %}
{% for x in [] %}never{% else %}empty{% endfor %} {% for c in 'hé' %}<{{ c }}>{% endfor %}
{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', punct='?') }}
{% set block %}  inside {{ 1 + 1 }}  {% endset %}[{{ block }}] {{ {'a': {'b': 'deep'}}.a.b }} {{ {'a': 1}.get('z', 'none') }} {{ [10, 20][-1] }}"""

NEWLINES = "a\r\nb{% if true %}\r\nc{% endif %}\rd\n"

LOOP_SCOPE = """{% for x in [1, 2] %}{% if x == 1 %}{% set y = 'a' %}{% endif %}[{{ y }}]{% endfor %}
{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + 1 %}{{ x }};{% endfor %}{{ x }}
{% for i in [] %}{% else %}{% set z = 'inner' %}{% endfor %}[{{ z }}]"""

NUMBERS = """{{ [1e5, 1e15, 0.0001, 5e-4, 1e16, 1.5e-5, 0.1, -0.0, 123.456, 2.5e20] }} {{ x }} {{ n }}
{{ {'f': 1.0, 'g': 1e-7} | tojson }} {{ 9007199254740993 }} {{ 7 // -2 }} {{ -7 % -3 }}"""

TOJSON = r"""{{ {'b': [1, 'é'], 'a': none} | tojson(separators=(',', ':')) }}
{{ {'b': 1, 'a': {'d': 2, 'c': 3}} | tojson(sort_keys=true) }} {{ 'é\b\f\x01' | tojson }}
{{ 'é😀' | tojson(true) }} {{ [1, {'k': []}] | tojson(indent=2) }} {{ {} | tojson(indent=2) }}"""

ESCAPES = r"""{{ '\u2019\x41\t|\U0001F600|\\n' }} {{ "it's" }} {{ 'a' ~ 2 * 3 ~ 'b' }} {{ (1 + 2) ~ 'x' }}"""

FILTERS = """{{ ['b', 'A', 'c'] | sort }} {{ [3, 1, 2] | sort(reverse=true) }} {{ messages | sort(attribute='role') | map(attribute='role') | join(',') }}
{{ {'b': 2, 'A': 1} | dictsort }} {{ {'b': 2, 'a': 3} | dictsort(by='value') }} {{ [1, 2, 3.5] | sum }} {{ messages | map(attribute='content') | map('length') | sum }}
{{ [4, 1, 9] | min }} {{ ['b', 'A'] | max }} {{ 2.5 | round }} {{ 3.14159 | round(2) }} {{ 2.7 | round(method='floor') }}
{{ "a\nb\n\nc" | indent(2) }}|{{ "x\ny" | indent(first=true) }}|{{ 'one two, three' | wordcount }} {{ 'banana'.count('an') }}
{{ "%sr" | format('Paris') }} {{ "%s-%d|%5.2f|%-4s|%03d|%r|%%" | format('a', 7, 3.14159, 'b', 5, 'q') }} {{ "%(x)s=%(y)s" | format(x=1, y='two') }}
{{ "%s and %s" % ('a', 'b') }} {{ "%s" % [1, 2] }} {{ "%x %o %c" % (255, 8, 65) }} {{ "%.3s|%6s|" % ('abcdef', 'hi') }} {{ {'k': 1} | items | list }}
{{ 2 ** 10 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }} {{ 2 ** -1 }} {{ 2.5 ** 2 }} {% for x in range(5) %}{{ loop.cycle('odd', 'even') }} {% endfor %}"""

CASES = [
    ("chatml", CHATML, {"messages": CHAT, "add_generation_prompt": True}),
    ("chatml_default_system", CHATML, {"messages": NO_SYSTEM, "add_generation_prompt": True}),
    ("chatml_no_prompt", CHATML, {"messages": NO_SYSTEM, "add_generation_prompt": False}),
    ("headers", HEADERS, {"messages": CHAT, "add_generation_prompt": True,
                          "bos_token": "<|begin_of_text|>"}),
    ("inst", INST, {"messages": CHAT, "bos_token": "<s>", "eos_token": "</s>"}),
    ("inst_no_system", INST, {"messages": NO_SYSTEM, "bos_token": "<s>", "eos_token": "</s>"}),
    ("inst_not_alternating", INST, {"messages": [CHAT[1], CHAT[1]], "bos_token": "<s>",
                                    "eos_token": "</s>"}),
    ("turns", TURNS, {"messages": CHAT, "add_generation_prompt": True, "bos_token": "<bos>"}),
    ("turns_no_system", TURNS, {"messages": NO_SYSTEM, "add_generation_prompt": False,
                                "bos_token": "<bos>"}),
    ("tools", WITH_TOOLS, {"messages": NO_SYSTEM, "tools": TOOLS}),
    ("no_tools", WITH_TOOLS, {"messages": NO_SYSTEM}),
    ("whitespace", WHITESPACE, {}),
    ("expressions", EXPRESSIONS, {"messages": CHAT}),
    ("newlines", NEWLINES, {}),
    ("loop_scope", LOOP_SCOPE, {}),
    ("numbers", NUMBERS, {"x": 1.0, "n": 3}),
    ("tojson", TOJSON, {}),
    ("escapes", ESCAPES, {}),
    ("filters", FILTERS, {"messages": CHAT}),
]


def main():
    env = environment()
    out = []
    for name, source, context in CASES:
        case = {"name": name, "template": source, "context": context}
        try:
            case["expected"] = env.from_string(source).render(**context)
        except jinja2.exceptions.TemplateError as e:
            case["error"] = str(e)
        out.append(case)
    path = "coordinator/testdata/jinja_cases.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote %d cases to %s (jinja2 %s)" % (len(out), path, jinja2.__version__),
          file=sys.stderr)


if __name__ == "__main__":
    main()
