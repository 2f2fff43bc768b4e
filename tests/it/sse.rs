//! SSE robustness: events cut anywhere (even inside a UTF-8 character), CRLF
//! line ends, comments, pings, and the optional parts of the format.

use llm_gateway::api::pb;

use crate::{
    harness::{Gateway, stream_call, stream_request},
    streaming::assert_stream_shape,
    upstream::{Reply, Step, Upstream, split_bytes},
    wire::{anthropic, openai},
};

const PIECES: &[&str] = &["Ça ", "marche — ", "très ", "bien ✓ 🚀", "!"];

fn text() -> String {
    PIECES.concat()
}

fn openai_events() -> Vec<String> {
    openai::answer("chatcmpl-s", "gpt-sse", PIECES, "stop", 4, 5)
}

fn anthropic_events() -> Vec<String> {
    anthropic::answer("msg_s", "claude-sse", PIECES, "end_turn", 6, 5)
}

/// Streams `reply` through `model` and checks the whole answer arrived.
async fn assert_whole_answer(reply: Reply, model: &str, provider: &str, upstream_model: &str) {
    let up = Upstream::start(reply).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request(model, "hi")).await;
    if let Err(e) = &got.end {
        panic!("the stream failed: {e:?}; got {:?}", got.messages);
    }
    assert_eq!(got.text(), text());
    let usage = assert_stream_shape(&got.messages, provider, upstream_model, pb::FinishReason::Stop);
    assert_eq!(usage.output_tokens, 5);
}

#[tokio::test]
async fn openai_events_cut_anywhere() {
    let body = openai_events().concat();
    assert_whole_answer(Reply::sse(split_bytes(&body, &[1, 2, 3, 5, 8, 13, 21])), "chat", "oa", "gpt-sse")
        .await;
}

#[tokio::test]
async fn anthropic_events_cut_anywhere() {
    let body = anthropic_events().concat();
    assert_whole_answer(Reply::sse(split_bytes(&body, &[7, 1, 4, 2, 11])), "claude", "an", "claude-sse")
        .await;
}

#[tokio::test]
async fn openai_crlf_line_ends() {
    let body = openai_events().concat().replace('\n', "\r\n");
    assert_whole_answer(Reply::sse(split_bytes(&body, &[3, 17, 1, 29])), "chat", "oa", "gpt-sse").await;
}

#[tokio::test]
async fn anthropic_crlf_line_ends() {
    let events: Vec<String> = anthropic_events().iter().map(|e| e.replace('\n', "\r\n")).collect();
    assert_whole_answer(Reply::events(&events), "claude", "an", "claude-sse").await;
}

#[tokio::test]
async fn openai_comments_between_events() {
    let mut events = vec![": OPENROUTER PROCESSING\n\n".to_owned()];
    for e in openai_events() {
        events.push(e);
        events.push(": keep-alive\n\n".to_owned());
    }
    assert_whole_answer(Reply::events(&events), "chat", "oa", "gpt-sse").await;
}

#[tokio::test]
async fn anthropic_pings_and_comments() {
    let mut events = Vec::new();
    for e in anthropic_events() {
        events.push(anthropic::ping());
        // A comment line inside an event is ignored, the event still counts.
        events.push(e.replacen("\ndata: ", "\n: a comment inside the event\ndata: ", 1));
    }
    events.push(": trailing comment\n\n".to_owned());
    assert_whole_answer(Reply::events(&events), "claude", "an", "claude-sse").await;
}

#[tokio::test]
async fn optional_sse_syntax() {
    // `data:` without a space, `id:` and `retry:` fields, blank lines between events.
    let events: Vec<String> = openai_events()
        .iter()
        .enumerate()
        .map(|(i, e)| format!("id: {i}\nretry: 1000\n{}\n\n\n", e.trim_end().replacen("data: ", "data:", 1)))
        .collect();
    assert_whole_answer(Reply::events(&events), "chat", "oa", "gpt-sse").await;
}

#[tokio::test]
async fn openai_close_after_finish_reason_without_done() {
    // Some compatible servers end the body without `[DONE]`; a finish reason
    // already seen makes the answer whole.
    let mut events = openai_events();
    assert_eq!(events.pop().as_deref(), Some(openai::DONE));
    assert_whole_answer(Reply::events(&events), "chat", "oa", "gpt-sse").await;
}

#[tokio::test]
async fn events_paced_apart_arrive_as_separate_deltas() {
    let mut steps = Vec::new();
    for e in openai_events() {
        steps.push(Step::send(e));
        steps.push(Step::sleep_ms(5));
    }
    let up = Upstream::start(Reply::sse(steps)).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    got.end.as_ref().expect("the stream ends OK");
    // One message per upstream delta (CONTRACT.md section 1): nothing merged
    // or split on the way.
    let contents: Vec<&str> =
        got.messages.iter().map(|m| m.content.as_str()).filter(|c| !c.is_empty()).collect();
    assert_eq!(contents, PIECES);
}
