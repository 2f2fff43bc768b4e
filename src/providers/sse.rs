//! Turns an upstream SSE body into a [`DeltaStream`] through a per-provider
//! translator, driven by the caller's reads: no task, no channel, so dropping
//! the stream drops the upstream body and with it the connection.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::Stream;

use super::{DeltaStream, ProviderError, http::error_chain};
use crate::chat::Delta;

/// A stateful translation of one provider's SSE events into deltas.
pub(crate) trait Translate: Send + Unpin + 'static {
    /// Handles one event. Returns a delta to forward, if the event makes one;
    /// the final delta is the one with `finish` set.
    fn event(&mut self, event: Event) -> Result<Option<Delta>, ProviderError>;

    /// The upstream closed its body. Returns the final delta when the answer
    /// is complete without an explicit end marker, or an error.
    fn eof(&mut self) -> Result<Option<Delta>, ProviderError>;
}

/// The deltas of an SSE response, translated by `translator`.
pub(crate) fn deltas<T: Translate>(response: reqwest::Response, translator: T) -> DeltaStream {
    from_body(response.bytes_stream(), translator)
}

/// The deltas of an SSE body given as a stream of chunks: what [`deltas`]
/// does with a response, and what transcript replays feed directly.
pub(crate) fn from_body<S, T>(body: S, translator: T) -> DeltaStream
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
    T: Translate,
{
    Box::pin(Translated {
        events: Box::pin(EventBound::new(Box::pin(body)).eventsource()),
        translator,
        state: State::Open,
    })
}

/// The SSE events of a body, split exactly as [`from_body`] splits them,
/// with no translator: for fuzzing the splitting alone.
pub(crate) fn events<S>(body: S) -> impl Stream<Item = Result<Event, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    use futures_util::StreamExt;
    EventBound::new(body).eventsource().map(|e| e.map_err(stream_error))
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<BodyError>>> + Send>>;

#[derive(PartialEq)]
enum State {
    Open,
    /// The final delta was forwarded; what is left of the body is drained.
    Finished,
    Closed,
}

struct Translated<T> {
    events: Events,
    translator: T,
    state: State,
}

impl<T: Translate> Stream for Translated<T> {
    type Item = Result<Delta, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Closed => return Poll::Ready(None),
                State::Finished => {
                    // Reading the body to its end (usually the chunked
                    // terminator, already buffered) returns the connection to
                    // the pool; if the upstream lingers, drop it instead.
                    this.state = State::Closed;
                    while let Poll::Ready(Some(Ok(_))) = this.events.as_mut().poll_next(cx) {}
                    return Poll::Ready(None);
                }
                State::Open => {}
            }
            let item = match ready!(this.events.as_mut().poll_next(cx)) {
                Some(Ok(event)) => this.translator.event(event),
                Some(Err(e)) => Err(stream_error(e)),
                None => {
                    this.state = State::Closed;
                    match this.translator.eof() {
                        Ok(Some(delta)) => return Poll::Ready(Some(Ok(delta))),
                        Ok(None) => return Poll::Ready(None),
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
            };
            match item {
                Ok(Some(delta)) => {
                    if delta.finish.is_some() {
                        this.state = State::Finished;
                    }
                    return Poll::Ready(Some(Ok(delta)));
                }
                Ok(None) => continue,
                Err(e) => {
                    this.state = State::Closed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

fn stream_error(e: EventStreamError<BodyError>) -> ProviderError {
    match e {
        EventStreamError::Transport(BodyError::Transport(e)) => {
            ProviderError::Stream(error_chain(&e.without_url()))
        }
        EventStreamError::Transport(BodyError::TooLarge) => {
            ProviderError::Protocol(format!("an SSE event over {MAX_EVENT} bytes"))
        }
        EventStreamError::Transport(BodyError::Utf8) => ProviderError::Protocol("invalid UTF-8".into()),
        EventStreamError::Utf8(e) => ProviderError::Protocol(format!("invalid UTF-8: {e}")),
        EventStreamError::Parser(e) => ProviderError::Protocol(format!("invalid SSE: {e}")),
    }
}

/// Parses an event's JSON payload, naming the event on failure.
pub(crate) fn json<'a, D: serde::Deserialize<'a>>(data: &'a str) -> Result<D, ProviderError> {
    serde_json::from_str(data).map_err(|e| {
        let mut shown: String = data.chars().take(120).collect();
        if shown.len() < data.len() {
            shown.push('…');
        }
        ProviderError::Protocol(format!("{e} in event data {shown:?}"))
    })
}

/// Largest SSE event accepted. eventsource-stream buffers an event until its
/// blank line, so an upstream that never sends one must be cut off.
const MAX_EVENT: usize = 1 << 20;

/// Largest piece of body handed to eventsource-stream at once. It copies
/// what is left of its buffer after every line it parses, so the cost of a
/// piece grows with its size times its lines: a 400 KiB chunk of short
/// lines (hyper's reads grow that large) took seconds of a runtime thread.
const MAX_PIECE: usize = 8 << 10;

/// The UTF-8 byte order mark an SSE body may start with.
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug)]
pub(crate) enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
    Utf8,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Transport(e) => e.fmt(f),
            BodyError::TooLarge => write!(f, "event over {MAX_EVENT} bytes"),
            BodyError::Utf8 => f.write_str("invalid UTF-8"),
        }
    }
}

/// Guards eventsource-stream from what it mishandles, in front of it:
/// - counts the bytes of the event being received (since the last blank
///   line) and fails the body once one passes [`MAX_EVENT`];
/// - strips leading byte order marks, which it would slice at a byte that
///   is not a char boundary (a panic, found by fuzzing);
/// - checks UTF-8 as the bytes arrive: it keeps every byte after an invalid
///   one in a buffer that grows, unread, to the end of the body;
/// - hands it the body in pieces of at most [`MAX_PIECE`] bytes.
struct EventBound<S> {
    inner: S,
    pending: usize,
    newline: bool,
    /// While the body has only sent (part of) byte order marks: how many
    /// bytes of the current one. None once anything else came.
    start: Option<usize>,
    utf8: Utf8Check,
    /// What is left of a chunk cut into pieces.
    rest: Option<bytes::Bytes>,
    /// The body turned out not to be UTF-8: the error is due (Some(false))
    /// or was given (Some(true)).
    invalid: Option<bool>,
}

impl<S> EventBound<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: 0,
            newline: false,
            start: Some(0),
            utf8: Utf8Check::default(),
            rest: None,
            invalid: None,
        }
    }

    /// The chunk without leading byte order marks; None when nothing is left.
    fn strip_bom(&mut self, chunk: bytes::Bytes) -> Option<bytes::Bytes> {
        let mut held = self.start?;
        for (i, &b) in chunk.iter().enumerate() {
            if b == BOM[held] {
                held = (held + 1) % BOM.len();
                continue;
            }
            self.start = None;
            let rest = chunk.slice(i..);
            // Bytes that looked like the start of a mark belong to the body.
            return Some(if held == 0 { rest } else { [&BOM[..held], &rest[..]].concat().into() });
        }
        self.start = Some(held);
        None
    }
}

impl<S> EventBound<S>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Unpin,
{
    /// The next chunk of the body, past any leading byte order marks.
    fn next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<bytes::Bytes, BodyError>>> {
        loop {
            let chunk = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Poll::Ready(Some(Err(BodyError::Transport(e)))),
                None => return Poll::Ready(None),
            };
            if self.start.is_none() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if let Some(chunk) = self.strip_bom(chunk) {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
    }
}

impl<S> Stream for EventBound<S>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Unpin,
{
    type Item = Result<bytes::Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.invalid {
            Some(false) => {
                self.invalid = Some(true);
                return Poll::Ready(Some(Err(BodyError::Utf8)));
            }
            Some(true) => return Poll::Ready(None),
            None => {}
        }
        let chunk = match self.rest.take() {
            Some(rest) => rest,
            None => match ready!(self.next_chunk(cx)) {
                Some(Ok(chunk)) => chunk,
                other => return Poll::Ready(other),
            },
        };
        let chunk = if chunk.len() > MAX_PIECE {
            self.rest = Some(chunk.slice(MAX_PIECE..));
            chunk.slice(..MAX_PIECE)
        } else {
            chunk
        };
        // The events before an invalid byte are passed on, as the parser
        // would have; the error comes next.
        let chunk = match self.utf8.check(&chunk) {
            Ok(()) => chunk,
            Err(valid) => {
                self.invalid = Some(false);
                if valid == 0 {
                    return self.poll_next(cx);
                }
                chunk.slice(..valid)
            }
        };
        let (mut pending, mut newline) = (self.pending, self.newline);
        // Line by line (memchr, not byte by byte): a line's bytes other than
        // CR count toward the event; an empty line ends it.
        let mut rest: &[u8] = &chunk;
        loop {
            let (line, end) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            let counted = line.len() - memchr::memchr_iter(b'\r', line).count();
            if counted > 0 {
                pending += counted;
                newline = false;
            }
            if !end {
                break;
            }
            if newline {
                pending = 0;
            }
            newline = true;
            rest = &rest[line.len() + 1..];
        }
        self.pending = pending;
        self.newline = newline;
        if pending > MAX_EVENT {
            return Poll::Ready(Some(Err(BodyError::TooLarge)));
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// UTF-8 validation across chunks: the bytes of a character that a chunk
/// boundary cut (at most 3) wait for the next chunk.
#[derive(Default)]
struct Utf8Check {
    carry: [u8; 4],
    carried: usize,
}

impl Utf8Check {
    /// Err once the body is not UTF-8, with the length of the chunk's valid
    /// start.
    fn check(&mut self, chunk: &[u8]) -> Result<(), usize> {
        let mut rest = chunk;
        while self.carried > 0 {
            match std::str::from_utf8(&self.carry[..self.carried]) {
                Ok(_) => self.carried = 0,
                Err(e) if e.error_len().is_some() => return Err(0),
                Err(_) => {
                    let Some((&b, tail)) = rest.split_first() else { return Ok(()) };
                    let Some(slot) = self.carry.get_mut(self.carried) else { return Err(0) };
                    *slot = b;
                    self.carried += 1;
                    rest = tail;
                }
            }
        }
        let checked = chunk.len() - rest.len();
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(checked + e.valid_up_to()),
            Err(e) => {
                // The end of the chunk cut a character: keep its bytes.
                let tail = &rest[e.valid_up_to()..];
                match self.carry.get_mut(..tail.len()) {
                    Some(slot) => {
                        slot.copy_from_slice(tail);
                        self.carried = tail.len();
                        Ok(())
                    }
                    None => Err(checked + e.valid_up_to()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn an_event_without_end_is_cut_off() {
        let chunks: Vec<Result<bytes::Bytes, reqwest::Error>> = vec![
            Ok(bytes::Bytes::from_static(b"data: a\r\n\r\n")),
            Ok(bytes::Bytes::from(vec![b'x'; MAX_EVENT / 2])),
            Ok(bytes::Bytes::from(vec![b'\n'])),
            Ok(bytes::Bytes::from(vec![b'x'; MAX_EVENT / 2 + 2])),
        ];
        let mut s = EventBound::new(futures_util::stream::iter(chunks));
        let mut passed = 0;
        let error = loop {
            match s.next().await {
                Some(Ok(piece)) => passed += piece.len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended with no error"),
            }
        };
        // One newline alone does not end an event: the two halves add up.
        assert!(matches!(error, BodyError::TooLarge), "{error}");
        assert!(passed > MAX_EVENT / 2 + 12, "cut off after {passed} bytes");
    }

    /// The byte-at-a-time count the line-by-line one replaced.
    fn count_bytewise(bytes: &[u8], mut pending: usize, mut newline: bool) -> (usize, bool) {
        for &b in bytes {
            match b {
                b'\n' if newline => pending = 0,
                b'\n' => newline = true,
                b'\r' => {}
                _ => {
                    newline = false;
                    pending += 1;
                }
            }
        }
        (pending, newline)
    }

    #[tokio::test]
    async fn event_sizes_are_counted_as_byte_by_byte_over_any_chunking() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..64);
            let body: Vec<u8> = (0..len).map(|_| *rng.choice(b"\n\n\rxy").unwrap_or(&b'x')).collect();
            let cut = rng.usize(0..=len);
            let chunks: Vec<Result<bytes::Bytes, reqwest::Error>> = vec![
                Ok(bytes::Bytes::copy_from_slice(&body[..cut])),
                Ok(bytes::Bytes::copy_from_slice(&body[cut..])),
            ];
            let mut s = EventBound::new(futures_util::stream::iter(chunks));
            while let Some(piece) = s.next().await {
                assert!(piece.is_ok(), "{body:?}");
            }
            assert_eq!((s.pending, s.newline), count_bytewise(&body, 0, false), "{body:?} cut at {cut}");
        }
    }

    fn events(chunks: &[&[u8]]) -> Vec<Result<String, String>> {
        let chunks = chunks.iter().map(|c| bytes::Bytes::copy_from_slice(c)).collect();
        super::super::fuzzing::sse_events(chunks)
            .into_iter()
            .map(|e| e.map(|e| e.data).map_err(|e| e.to_string()))
            .collect()
    }

    // Found by fuzzing: eventsource-stream sliced `&s[1..]` past a leading
    // U+FEFF, which is 3 bytes in UTF-8: a panic in the stream's poll.
    #[test]
    fn a_leading_byte_order_mark_is_skipped_not_a_panic() {
        let ok = |d: &str| Ok::<_, String>(d.to_owned());
        assert_eq!(events(&[b"\xEF\xBB\xBFdata: a\n\n"]), [ok("a")]);
        assert_eq!(events(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]), [ok("a")]);
        assert_eq!(events(&[b"\xEF\xBB\xBF\xEF\xBB", b"\xBFdata: b\n\n"]), [ok("b")]);
        // Bytes that only began like a mark are the body's.
        assert_eq!(events(&[b"\xEF\xBB", b"\x80: c\ndata: d\n\n"]), [ok("d")]);
        assert_eq!(events(&[b"\xEF\xBB"]), []);
    }

    // eventsource-stream kept every byte after an invalid one, unparsed, to
    // the end of the body: an answer that never came, in a growing buffer.
    #[test]
    fn invalid_utf8_ends_the_body_at_once() {
        let got = events(&[b"data: a\n\n", b"data: \xFF\n\n", b"data: b\n\n"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], Ok("a".to_owned()));
        assert!(got[1].as_ref().is_err_and(|e| e.contains("invalid UTF-8")), "{got:?}");
        // What came before the invalid byte in its chunk is still read.
        let got = events(&[b"data: a\n\ndata: \xFF\n\ndata: b\n\n"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], Ok("a".to_owned()));
        // A character cut by chunk boundaries is whole again.
        let got = events(&[b"data: \xE2", b"\x82", b"\xAC \xF0\x9F", b"\x98\x80\n\n"]);
        assert_eq!(got, [Ok("\u{20ac} \u{1f600}".to_owned())]);
        // An overlong or truncated sequence is caught across the boundary too.
        let got = events(&[b"data: \xE2\x82", b"x\n\n"]);
        assert!(got.iter().any(Result::is_err), "{got:?}");
    }

    #[tokio::test]
    async fn a_large_chunk_reaches_the_parser_in_pieces() {
        let body = b"data: a\n\n".repeat(MAX_PIECE / 4);
        let chunks: Vec<Result<bytes::Bytes, reqwest::Error>> = vec![Ok(body.clone().into())];
        let pieces: Vec<_> = EventBound::new(futures_util::stream::iter(chunks)).collect().await;
        assert!(pieces.len() > 1, "{} pieces", pieces.len());
        let mut joined = Vec::new();
        for piece in pieces {
            let piece = piece.unwrap();
            assert!(piece.len() <= MAX_PIECE, "a piece of {} bytes", piece.len());
            joined.extend_from_slice(&piece);
        }
        assert_eq!(joined, body);
    }
}
