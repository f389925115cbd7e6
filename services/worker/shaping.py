"""How one OpenAI request is shaped for an engine: what it may not ask for, how its chat prompt
is rendered, the engine's SamplingParams, the reply's role and echo. Pure, no I/O.

Every outcome is a value or the ApiError (a 400) that names the field at fault; http.py asks
here before it takes a slot.
"""

from __future__ import annotations

from typing import TypeVar

from schemas.inference import ChatCompletionRequest, SamplingFields
from services.common.errors import ApiError, invalid
from services.worker import tools
from services.worker.engines import grammar
from services.worker.engines.params import EngineLimits, SamplingParams
from services.worker.engines.penalties import BadBias, parse_bias
from services.worker.engines.template import IMAGE_PART, ChatOptions, refused_part

Num = TypeVar("Num", int, float)


def unsupported(req: SamplingFields) -> ApiError | None:
    """A feature no engine here has is refused by name, never answered as if not asked."""
    param = req.unsupported()
    if param is None:
        return None
    return invalid(
        f"{param} is not supported here; remove it or send its default "
        "(0, null or false) and the request will be served",
        "unsupported_parameter",
        param,
    )


def refused_content(req: ChatCompletionRequest, accepts_images: bool) -> ApiError | None:
    """The first content part the model cannot take (refused rather than dropped)."""
    refused = refused_part(req.messages, accepts_images)
    if refused is None:
        return None
    where, kind = refused
    takes = f"text and {IMAGE_PART}" if accepts_images else "text"
    return invalid(
        f"{where} is a {kind!r} part; model {req.model} takes only {takes} parts",
        "unsupported_content",
        where,
    )


def logit_bias(req: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...] | ApiError:
    """OpenAI's {"<token id>": bias} as sorted (id, bias) pairs, or the refusal naming the key."""
    try:
        return parse_bias(req.logit_bias, vocab_size)
    except BadBias as exc:
        return invalid(str(exc), "invalid_value", "logit_bias")


def sampling(
    req: SamplingFields,
    prompt_tokens: int,
    limits: EngineLimits,
    vocab_size: int,
    default_max_tokens: int = 0,
) -> SamplingParams | ApiError:
    """The engine's parameters for a prompt of prompt_tokens, or why it cannot be served.

    No max_tokens: the rest of the context (OpenAI's default), at most default_max_tokens if set.
    A field sent as null takes its default (OpenAI's meaning of null).
    """
    wanted = max_tokens(req, prompt_tokens, limits.max_context, default_max_tokens)
    if isinstance(wanted, ApiError):
        return wanted
    bias = logit_bias(req, vocab_size)
    if isinstance(bias, ApiError):
        return bias
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        # as OpenAI answers it: alternatives of nothing
        return invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    # response_format, guided_*, ...
    constraint = grammar.requested(req.constraint_fields(), req.guided_whitespace_pattern or None)
    if isinstance(constraint, grammar.Problem):
        return invalid(constraint.message, "invalid_value", constraint.param)
    why = cannot_constrain(req, constraint, limits) or ends(req, wanted, constraint, vocab_size)
    if why is not None:
        return why
    return SamplingParams(
        max_tokens=wanted,
        temperature=_or(req.temperature, 1.0),
        top_p=_or(req.top_p, 1.0),
        top_k=_or(req.top_k, 0),
        min_p=_or(req.min_p, 0.0),
        seed=req.seed,
        stop=req.stop_strings(),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        min_tokens=_or(req.min_tokens, 0),
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        logit_bias=bias,
        logprobs=req.wanted_logprobs(),
        constraint=constraint,
    )


def _or(value: Num | None, default: Num) -> Num:
    return default if value is None else value


def max_tokens(
    req: SamplingFields, prompt_tokens: int, context: int, default_max_tokens: int
) -> int | ApiError:
    """The tokens the completion may take, or why the prompt (or max_tokens) does not fit."""
    if isinstance(req, ChatCompletionRequest):
        cap, prompt_param = req.max_completion_tokens or req.max_tokens, "messages"
    else:
        cap, prompt_param = req.max_tokens, "prompt"
    room = context - prompt_tokens
    if room <= 0:  # not one token of room: the prompt is at fault, whatever max_tokens says
        return invalid(
            f"the prompt ({prompt_tokens} tokens) leaves no room in the model's context of "
            f"{context} tokens",
            "context_length_exceeded",
            prompt_param,
        )
    wanted = cap if cap is not None else min(default_max_tokens or room, room)
    if wanted > room:
        return invalid(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({wanted}) exceeds the "
            f"model's context of {context} tokens",
            "context_length_exceeded",
            "max_tokens",
        )
    return wanted


def cannot_constrain(
    req: SamplingFields, constraint: grammar.Constraint | None, limits: EngineLimits
) -> ApiError | None:
    """A constraint (or a forced tool call) the engine cannot enforce, refused by name."""
    if limits.constrains_output:
        return None
    if constraint is not None:
        param = constraint.param
    elif isinstance(req, ChatCompletionRequest) and tools.forces(req):
        param = "tool_choice"
    else:
        return None
    return invalid(
        f"{param}: this model cannot constrain its output here (its checkpoint has no "
        "tokenizer.json); send it without an output constraint",
        "unsupported_parameter",
        param,
    )


def ends(
    req: SamplingFields, wanted: int, constraint: grammar.Constraint | None, vocab_size: int
) -> ApiError | None:
    """What is wrong with vLLM's stop_token_ids and min_tokens, if anything."""
    for token in req.stop_token_ids or ():
        if token >= vocab_size:
            message = (
                f"stop_token_ids: {token} is not a token id of this model (0..{vocab_size - 1})"
            )
            return invalid(message, "invalid_value", "stop_token_ids")
    least = req.min_tokens or 0
    if least and len(set(req.stop_token_ids or ())) >= vocab_size:
        message = "min_tokens with every token in stop_token_ids leaves nothing to generate"
        return invalid(message, "invalid_value", "min_tokens")
    if least > wanted:
        message = f"min_tokens ({least}) must be at most max_tokens ({wanted})"
        return invalid(message, "invalid_value", "min_tokens")
    # vLLM holds stop strings back until min_tokens too, exllamav2 does not; and a grammar's end
    # cannot wait. Refused rather than served differently on one engine.
    clash = "stop" if req.stop_strings() else None if constraint is None else constraint.param
    if least and clash is not None:
        return invalid(
            f"min_tokens cannot be combined with {clash} here",
            "unsupported_parameter",
            "min_tokens",
        )
    return None


# ---- the chat prompt and the reply's role ----

# What chat_template_kwargs may not set: what the worker hands the template itself, and
# apply_chat_template's own arguments (transformers reads them as such, not as variables).
RESERVED_VARIABLES = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "raise_exception",
        "strftime_now",
    }
)
SWITCHES = ("add_generation_prompt", "continue_final_message")
MAX_VARIABLES = 64


def chat_options(req: ChatCompletionRequest) -> ChatOptions | ApiError:
    """How the request's prompt is rendered: vLLM's add_generation_prompt (default true),
    continue_final_message and chat_template_kwargs (which may set those two as well, and win,
    as in vLLM). Special tokens (`*_token`) and RESERVED_VARIABLES are the worker's to set."""
    variables = dict(req.chat_template_kwargs or {})
    param = "chat_template_kwargs"
    if len(variables) > MAX_VARIABLES:
        return invalid(f"{param} has over {MAX_VARIABLES} keys", "invalid_value", param)
    switches: dict[str, bool] = {}
    for name in SWITCHES:
        if name in variables:
            value = variables.pop(name)
            if not isinstance(value, bool):
                return invalid(f"{param}.{name} must be true or false", "invalid_value", param)
            switches[name] = value
    for name in variables:
        if name in RESERVED_VARIABLES or name.endswith(("_token", "_tokens")):
            message = f"{param}.{name} is the worker's to set, not a request's"
            return invalid(message, "invalid_value", param)
        if not name.isidentifier():
            return invalid(
                f"{param}.{name[:64]} is not a template variable", "invalid_value", param
            )
    opened = switches.get("add_generation_prompt", req.add_generation_prompt is not False)
    continued = switches.get("continue_final_message", bool(req.continue_final_message))
    if opened and continued:
        return invalid(
            "continue_final_message needs add_generation_prompt: false (a reply continues the "
            "last message or opens a new one, not both)",
            "invalid_value",
            "continue_final_message",
        )
    return ChatOptions(
        add_generation_prompt=opened, continue_final_message=continued, variables=variables
    )


def reply_role(req: ChatCompletionRequest, options: ChatOptions) -> str:
    """The reply's role, as vLLM names it: the assistant's when the prompt opens its turn, else
    the last message's (the reply goes on with it)."""
    return "assistant" if options.add_generation_prompt else req.messages[-1].role


def echoed(req: ChatCompletionRequest, role: str) -> str | None:
    """vLLM's chat echo: the text each choice starts with (the last message's, when it is of
    the reply's role; else ""); None: not asked."""
    if not req.echo:
        return None
    last = req.messages[-1]
    return last.text() if last.role == role else ""
