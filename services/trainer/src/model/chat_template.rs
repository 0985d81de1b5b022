//! Chat templates rendered as transformers' `apply_chat_template` renders them: Jinja with
//! `trim_blocks` and `lstrip_blocks`, the special tokens, `raise_exception`, `strftime_now`,
//! a `tojson` that writes JSON as Python's `json.dumps` does, and Python's string and dict
//! methods (`strip`, `startswith`, `items`, ...), here by minijinja.
//!
//! Assistant turns are located by rendering prefixes of the conversation (see
//! [`ChatTemplate::render_with_assistant_spans`]), so a template needs no `{% generation %}`
//! markers; where it has them they are accepted and ignored.

use crate::model::tokenizer_config::TokenizerConfig;
use chrono::{DateTime, Utc};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::fmt::Write as _;
use std::ops::Range;

const TEMPLATE_NAME: &str = "chat_template";

/// A model's chat template, ready to render conversations.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. `clock` is what `strftime_now` reports: templates such as Llama 3's
    /// print today's date, and a run (resumed or not) must render every example the same way.
    pub fn new(
        source: &str,
        tokens: &TokenizerConfig,
        clock: DateTime<Utc>,
    ) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function(
            "strftime_now",
            move |format: String| -> Result<String, Error> {
                let mut out = String::new();
                // chrono reports an invalid format as a formatting error rather than text.
                write!(out, "{}", clock.format(&format)).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: invalid format {format:?}"),
                    )
                })?;
                Ok(out)
            },
        );
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))?;
        Ok(ChatTemplate {
            env,
            bos_token: tokens.bos_token.clone(),
            eos_token: tokens.eos_token.clone(),
            pad_token: tokens.pad_token.clone(),
            unk_token: tokens.unk_token.clone(),
        })
    }

    /// The text of a conversation; `tools` is the example's tool list or `none`, as
    /// transformers passes it.
    pub fn render(
        &self,
        messages: &[Value],
        tools: &Value,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        self.env.get_template(TEMPLATE_NAME)?.render(context! {
            messages => messages,
            tools => tools,
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            pad_token => &self.pad_token,
            unk_token => &self.unk_token,
        })
    }

    /// The rendered conversation and the byte ranges of its assistant turns.
    ///
    /// For assistant message `i`, the turn is what rendering `messages[..=i]` adds to rendering
    /// `messages[..i]` with the generation prompt: the answer with its end-of-turn marker, but
    /// not the role header the prompt already holds. Both renderings must be prefixes of the
    /// whole conversation's; templates that render earlier turns differently once later ones
    /// exist (e.g. dropping reasoning from past turns) are refused, since their turns cannot be
    /// located this way.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Value],
        tools: &Value,
    ) -> Result<(String, Vec<Range<usize>>), String> {
        let failed = |e: Error| format!("the chat template failed: {}", describe(&e));
        let text = self.render(messages, tools, false).map_err(failed)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message
                .get_attr("role")
                .ok()
                .as_ref()
                .and_then(Value::as_str)
                != Some("assistant")
            {
                continue;
            }
            let prompt = self.render(&messages[..i], tools, true).map_err(failed)?;
            let through = self.render(&messages[..=i], tools, false).map_err(failed)?;
            if !text.starts_with(&through) || !through.starts_with(&prompt) {
                return Err(format!(
                    "the chat template renders the conversation up to message {} differently from the whole \
                     conversation, so its assistant turns cannot be located",
                    i + 1
                ));
            }
            spans.push(prompt.len()..through.len());
        }
        Ok((text, spans))
    }
}

/// A template error in one line, with minijinja's detail (e.g. what `raise_exception` said).
fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => detail.to_string(),
        None => err.to_string(),
    }
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, so `", "`
/// and `": "` between items without an indent, and no HTML escaping (unlike minijinja's own).
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(width) => {
            let spaces = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonSeparators,
        )),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let json = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(json))
}

/// Python's default `json.dumps` separators.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `{% generation %}…{% endgeneration %}` (transformers' assistant-mask extension) as a block
/// that always renders its body, since minijinja does not know the tag. Whitespace control
/// marks (`{%-`, `-%}`) are kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let inner = &tag[2..];
        let marks = inner.len() - inner.trim_start_matches(['-', '+']).len();
        let body = inner[marks..].trim_start();
        let keyword_at = 2 + inner.len() - body.len();
        let keyword = body
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .next()
            .unwrap_or("");
        let replacement = match keyword {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(replacement) => {
                out.push_str(&tag[..keyword_at]);
                out.push_str(replacement);
                rest = &tag[keyword_at + keyword.len()..];
            }
            None => {
                out.push_str("{%");
                rest = inner;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    /// SmolLM2-Instruct's template (ChatML with a default system prompt).
    pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Qwen2.5-Instruct's template: tools, tool calls with `tojson`, loop look-behind.
    pub const QWEN2: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// Llama 3.2-Instruct's template: `bos_token`, `strftime_now`, `raise_exception`,
    /// `tojson(indent=4)`, and (as some fine-tuning copies add) `{% generation %}` markers.
    pub const LLAMA3: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['role'] == 'assistant' %}
            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
        {%- else %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endif %}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    pub fn tokens(bos: &str, eos: &str) -> TokenizerConfig {
        TokenizerConfig {
            bos_token: Some(bos.into()),
            eos_token: Some(eos.into()),
            ..Default::default()
        }
    }

    pub fn conversation(json: &str) -> Vec<Value> {
        serde_json::from_str(json).unwrap()
    }

    fn clock() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 9, 12, 0, 0).unwrap()
    }

    fn spans_text(text: &str, spans: &[Range<usize>]) -> Vec<String> {
        spans.iter().map(|s| text[s.clone()].to_string()).collect()
    }

    #[test]
    fn chatml_turns_are_the_answers_with_their_end_markers() {
        let template =
            ChatTemplate::new(SMOLLM2, &tokens("<|im_start|>", "<|im_end|>"), clock()).unwrap();
        let messages = conversation(
            r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},
                {"role":"user","content":"bye"},{"role":"assistant","content":"ciao"}]"#,
        );
        let (text, spans) = template
            .render_with_assistant_spans(&messages, &Value::from(()))
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n\
             <|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nciao<|im_end|>\n"
        );
        assert_eq!(
            spans_text(&text, &spans),
            ["hello<|im_end|>\n", "ciao<|im_end|>\n"]
        );
    }

    #[test]
    fn qwen2_tool_calls_render_as_transformers_does() {
        let template =
            ChatTemplate::new(QWEN2, &tokens("<|endoftext|>", "<|im_end|>"), clock()).unwrap();
        let messages = conversation(
            r#"[{"role":"user","content":"weather in Paris?"},
                {"role":"assistant","content":"","tool_calls":[{"type":"function","function":{"name":"weather","arguments":{"city":"Paris","unit":"c"}}}]},
                {"role":"tool","content":"21"},{"role":"assistant","content":"It is 21 <b>°C</b>."}]"#,
        );
        let tools: Value = serde_json::from_str(
            r#"[{"type":"function","function":{"name":"weather","parameters":{}}}]"#,
        )
        .unwrap();
        let (text, spans) = template
            .render_with_assistant_spans(&messages, &tools)
            .unwrap();
        // As transformers renders it (checked against `render_jinja_template`).
        let expected = "<|im_start|>system\n\
             You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\
             \n\
             # Tools\n\
             \n\
             You may call one or more functions to assist with the user query.\n\
             \n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n\
             {\"type\": \"function\", \"function\": {\"name\": \"weather\", \"parameters\": {}}}\n\
             </tools>\n\
             \n\
             For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n\
             </tool_call><|im_end|>\n\
             <|im_start|>user\n\
             weather in Paris?<|im_end|>\n\
             <|im_start|>assistant\n\
             <tool_call>\n\
             {\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n\
             </tool_call><|im_end|>\n\
             <|im_start|>user\n\
             <tool_response>\n\
             21\n\
             </tool_response><|im_end|>\n\
             <|im_start|>assistant\n\
             It is 21 <b>°C</b>.<|im_end|>\n\
             ";
        assert_eq!(text, expected);
        assert_eq!(
            spans_text(&text, &spans),
            [
                "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call><|im_end|>\n",
                "It is 21 <b>°C</b>.<|im_end|>\n"
            ]
        );
    }

    #[test]
    fn llama3_uses_bos_the_clock_and_generation_markers() {
        let template =
            ChatTemplate::new(LLAMA3, &tokens("<|begin_of_text|>", "<|eot_id|>"), clock()).unwrap();
        let messages = conversation(
            r#"[{"role":"system","content":" Be brief. "},{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"}]"#,
        );
        let (text, spans) = template
            .render_with_assistant_spans(&messages, &Value::from(()))
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
             Today Date: 09 Mar 2025\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        );
        assert_eq!(spans_text(&text, &spans), ["4<|eot_id|>"]);
        let tools: Value = serde_json::from_str(r#"[{"name":"f"}]"#).unwrap();
        let err = template.render(&messages[..1], &tools, true).unwrap_err();
        assert!(describe(&err).contains("no first user message"), "{err:#}");
    }

    #[test]
    fn templates_that_rewrite_earlier_turns_are_refused() {
        let source = "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source, &TokenizerConfig::default(), clock()).unwrap();
        let messages =
            conversation(r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]"#);
        let err = template
            .render_with_assistant_spans(&messages, &Value::from(()))
            .unwrap_err();
        assert!(err.contains("up to message 2"), "{err}");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            without_generation_tags("a{%- generation -%}b{%+endgeneration %}{% if x %}{% endif %}"),
            "a{%- if true -%}b{%+endif %}{% if x %}{% endif %}"
        );
    }
}
