//! A built-in provider with no network: deterministic text, token count and
//! pacing, from its config or from the model name. It serves the embedded
//! default config, the tests and the benchmarks.
//!
//! The model name may carry overrides after a `?`, like a query string:
//! `lorem?tokens=20&delay=5ms&ttft=50ms`, `echo`, `x?fail=503`,
//! `x?fail_after=3`. The base name `echo` repeats the last user message.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{FutureExt, Stream, future::BoxFuture};
use tokio::time::{Instant, Sleep};

use super::{DeltaStream, Provider, ProviderError, UpstreamCall};
use crate::{
    chat::{ChatRequest, Delta, Finish, FinishReason, Role, Usage},
    config::{MockConfig, ProviderConfig},
};

const WORDS: &[&str] = &[
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "gateway",
    "streams", "every", "token", "as", "it", "arrives",
];

pub struct Mock {
    defaults: MockConfig,
}

impl Mock {
    pub fn new(config: &ProviderConfig) -> Self {
        Self { defaults: config.mock.clone() }
    }
}

/// What one call to the mock does, after the model name's overrides.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    echo: bool,
    tokens: u32,
    delay: Duration,
    ttft: Duration,
    fail: Option<u16>,
    fail_after: Option<u32>,
}

/// Pacing beyond an hour is a typo; it would also overflow the timer.
fn short(d: Duration) -> Option<Duration> {
    (d <= Duration::from_secs(3600)).then_some(d)
}

fn plan(defaults: &MockConfig, model: &str) -> Result<Plan, ProviderError> {
    let (base, query) = model.split_once('?').unwrap_or((model, ""));
    let mut plan = Plan {
        echo: base == "echo",
        tokens: defaults.tokens,
        delay: defaults.token_delay,
        ttft: defaults.first_token_delay,
        fail: None,
        fail_after: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || ProviderError::Status {
            status: 400,
            message: format!("mock model parameter {key}={value:?} is not valid"),
            retry_after: None,
        };
        match key {
            "tokens" => plan.tokens = value.parse().map_err(|_| bad())?,
            "delay" => {
                plan.delay = short(humantime::parse_duration(value).map_err(|_| bad())?).ok_or_else(bad)?
            }
            "ttft" => {
                plan.ttft = short(humantime::parse_duration(value).map_err(|_| bad())?).ok_or_else(bad)?
            }
            "fail" => plan.fail = Some(value.parse().map_err(|_| bad())?),
            "fail_after" => plan.fail_after = Some(value.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        }
    }
    Ok(plan)
}

impl Provider for Mock {
    fn system(&self) -> &'static str {
        "mock"
    }

    fn stream(&self, call: UpstreamCall) -> BoxFuture<'static, Result<DeltaStream, ProviderError>> {
        let plan = plan(&self.defaults, &call.model);
        async move {
            let plan = plan?;
            if let Some(status) = plan.fail {
                return Err(ProviderError::Status {
                    status,
                    message: format!("mock failure {status}"),
                    retry_after: (status == 429).then_some(Duration::from_secs(1)),
                });
            }
            let stream: DeltaStream = Box::pin(MockStream::new(plan, &call.request, call.model));
            Ok(stream)
        }
        .boxed()
    }
}

fn input_tokens(req: &ChatRequest) -> u32 {
    let words: usize = req.messages.iter().map(|m| m.content.split_whitespace().count()).sum();
    u32::try_from(words).unwrap_or(u32::MAX)
}

struct MockStream {
    plan: Plan,
    words: Vec<String>,
    model: String,
    sent: u32,
    input_tokens: u32,
    max_tokens: Option<u32>,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
    done: bool,
}

impl MockStream {
    fn new(plan: Plan, req: &ChatRequest, model: String) -> Self {
        let words = if plan.echo {
            req.messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let waiting = !plan.ttft.is_zero();
        Self {
            timer: Box::pin(tokio::time::sleep(plan.ttft)),
            waiting,
            input_tokens: input_tokens(req),
            max_tokens: req.max_tokens,
            plan,
            words,
            model,
            sent: 0,
            done: false,
        }
    }

    /// Tokens the answer would have without a max_tokens cut.
    fn natural(&self) -> u32 {
        if self.plan.echo { u32::try_from(self.words.len()).unwrap_or(u32::MAX) } else { self.plan.tokens }
    }

    fn total(&self) -> u32 {
        self.natural().min(self.max_tokens.unwrap_or(u32::MAX))
    }

    fn token(&self, i: u32) -> String {
        let last = i + 1 == self.total();
        let word = if self.plan.echo {
            self.words.get(i as usize).map(String::as_str).unwrap_or("")
        } else {
            WORDS[i as usize % WORDS.len()]
        };
        if last { word.to_owned() } else { format!("{word} ") }
    }
}

impl Stream for MockStream {
    type Item = Result<Delta, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.waiting {
            ready!(this.timer.as_mut().poll(cx));
            this.waiting = false;
        }
        if this.plan.fail_after == Some(this.sent) {
            this.done = true;
            return Poll::Ready(Some(Err(ProviderError::Stream("mock failure mid-stream".into()))));
        }
        let mut delta = Delta::default();
        if this.sent == 0 {
            delta.id = Some(format!("mock-{:016x}", fastrand::u64(..)));
            delta.model = Some(std::mem::take(&mut this.model));
        }
        if this.sent < this.total() {
            delta.content = this.token(this.sent);
            this.sent += 1;
            if !this.plan.delay.is_zero() {
                this.timer.as_mut().reset(Instant::now() + this.plan.delay);
                this.waiting = true;
            }
            return Poll::Ready(Some(Ok(delta)));
        }
        this.done = true;
        let reason = if this.natural() == this.total() { FinishReason::Stop } else { FinishReason::Length };
        delta.finish = Some(Finish {
            reason: Some(reason),
            usage: Usage { input_tokens: this.input_tokens, output_tokens: this.sent, ..Usage::default() },
        });
        Poll::Ready(Some(Ok(delta)))
    }
}

/// The full text the mock sends for `tokens` tokens (tests compare with it).
pub fn lorem(tokens: u32) -> String {
    (0..tokens).map(|i| WORDS[i as usize % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_overrides() {
        let d = MockConfig::default();
        let p = plan(&d, "lorem?tokens=3&delay=5ms&ttft=1s&fail_after=2").unwrap();
        assert_eq!(p.tokens, 3);
        assert_eq!(p.delay, Duration::from_millis(5));
        assert_eq!(p.ttft, Duration::from_secs(1));
        assert_eq!(p.fail_after, Some(2));
        assert!(plan(&d, "echo").unwrap().echo);
        assert!(plan(&d, "x?tokens=many").is_err());
        assert!(plan(&d, "x?bogus=1").is_err());
    }

    #[tokio::test]
    async fn streams_lorem_with_usage() {
        use futures_util::StreamExt;
        let mock = Mock { defaults: MockConfig::default() };
        let req = ChatRequest {
            messages: vec![crate::chat::Message::new(Role::User, "two words")],
            ..ChatRequest::default()
        };
        let call =
            UpstreamCall { request: req.into(), model: "m?tokens=5".into(), headers: Default::default() };
        let mut s = mock.stream(call).await.unwrap();
        let mut text = String::new();
        let mut finish = None;
        while let Some(d) = s.next().await {
            let d = d.unwrap();
            text.push_str(&d.content);
            finish = finish.or(d.finish);
        }
        assert_eq!(text, lorem(5));
        assert_eq!(finish.unwrap().usage, Usage { input_tokens: 2, output_tokens: 5, ..Usage::default() });
    }
}
