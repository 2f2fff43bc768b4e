#![no_main]

use llm_gateway::config::ProviderKind;

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_gateway_fuzz::checks::translate(ProviderKind::Gemini, data));
