//! What tokens cost, from the config's `prices` (USD per million tokens,
//! per provider and upstream model). Cached input tokens are billed at
//! `cached_input` when the provider reports them. No price: 0 USD.

use std::collections::HashMap;

use crate::config::PriceConfig;

/// Budgets count USD in nano-dollars: integers, exact in Redis and Lua
/// (a double holds them exactly up to 9 million USD).
pub const NANO_PER_USD: f64 = 1e9;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cached_input: f64,
}

#[derive(Debug, Default)]
pub struct Prices {
    by_target: HashMap<(String, String), Price>,
}

impl Prices {
    pub fn new(config: &[PriceConfig]) -> Self {
        let by_target = config
            .iter()
            .map(|p| {
                let price = Price {
                    input: p.input,
                    output: p.output,
                    cached_input: p.cached_input.unwrap_or(p.input),
                };
                ((p.provider.clone(), p.model.clone()), price)
            })
            .collect();
        Self { by_target }
    }

    pub fn get(&self, provider: &str, model: &str) -> Option<Price> {
        // Looked up once or twice per call: the tuple key's allocation is
        // cheaper than a second map level.
        self.by_target.get(&(provider.to_owned(), model.to_owned())).copied()
    }

    /// USD for one call's tokens; `cached` are among `input`.
    pub fn cost(&self, provider: &str, model: &str, input: u32, cached: u32, output: u32) -> f64 {
        self.get(provider, model).map_or(0.0, |p| p.cost(input, cached, output))
    }
}

impl Price {
    pub fn cost(&self, input: u32, cached: u32, output: u32) -> f64 {
        let cached = cached.min(input);
        let fresh = f64::from(input - cached);
        (fresh * self.input + f64::from(cached) * self.cached_input + f64::from(output) * self.output) / 1e6
    }
}

/// USD as whole nano-dollars (rounded up: a reservation never undercounts).
pub fn nano_usd(usd: f64) -> i64 {
    let n = (usd * NANO_PER_USD).ceil();
    if n.is_finite() { n as i64 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_input_has_its_own_price() {
        let prices = Prices::new(&[PriceConfig {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            input: 0.15,
            output: 0.60,
            cached_input: Some(0.075),
        }]);
        let usd = prices.cost("openai", "gpt-4o-mini", 1_000_000, 400_000, 100_000);
        // 600k * 0.15 + 400k * 0.075 + 100k * 0.60, per million
        assert!((usd - (0.09 + 0.03 + 0.06)).abs() < 1e-12, "{usd}");
        assert_eq!(prices.cost("openai", "other", 10, 0, 10), 0.0);
        assert_eq!(nano_usd(0.18), 180_000_000);
    }
}
