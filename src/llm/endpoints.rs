//! Several LLM endpoints (`[[llm.endpoints]]`), each a client behind its own circuit breaker,
//! and the model chain a call goes through.
//!
//! A template names an ordered list of models (`models = ["primary", "secondary"]`, or one
//! `model`, or none: `llm.default_model`). Its chain is, for each model in order, every
//! endpoint that lists the model, in configured order; a model no endpoint lists goes to every
//! endpoint that lists none (a catch-all). The same model on two endpoints is therefore two
//! entries, as two deployments of one model are. The pipeline tries the entries in order (see
//! `pipeline::llm_call`): a retryable failure once the entry's retries are spent, an open
//! circuit, or `llm.fallback_after_ms` spent on it moves the call to the next entry; when the
//! last one fails, the message gets its fallback reply.

use std::sync::Arc;

use super::{
    ChatRequest, ChatResponse, CircuitBreaker, LlmError, LlmService, OpenAiClient, Target,
};
use crate::config::LlmConfig;

/// The name of the endpoint `[llm]` describes when no `[[llm.endpoints]]` are given.
pub const DEFAULT_NAME: &str = "default";

/// One endpoint: its name, the models it lists, its client.
#[derive(Debug)]
struct Endpoint {
    name: Arc<str>,
    models: Vec<String>,
    service: CircuitBreaker<OpenAiClient>,
}

/// Every configured endpoint, in configured order.
#[derive(Debug)]
pub struct Endpoints {
    list: Vec<Endpoint>,
}

impl Endpoints {
    /// The endpoints of `config` (see [`LlmConfig::endpoint_configs`]), each HTTP version
    /// settled (a worker's first calls go over the connection later ones use).
    ///
    /// # Errors
    /// An invalid endpoint configuration.
    pub async fn from_config(config: &LlmConfig) -> Result<Endpoints, LlmError> {
        let configs = config
            .endpoint_configs()
            .map_err(|e| LlmError::Connect(e.to_string()))?;
        let mut list = Vec::with_capacity(configs.len());
        for (name, models, c) in configs {
            let client = OpenAiClient::named(&name, &c)?;
            // An endpoint that refuses connections settles nothing at once; one that does not
            // answer delays the start by `llm.connect_timeout_ms` at most.
            client.settle_http_version().await;
            let name: Arc<str> = name.into();
            list.push(Endpoint {
                service: CircuitBreaker::new(client, &c).named(name.clone()),
                name,
                models,
            });
        }
        Ok(Endpoints { list })
    }

    /// The endpoints' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|e| &*e.name).collect()
    }

    /// The entries a call of `models` (in order) tries (see the module doc).
    pub fn chain(&self, models: &[&str]) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        for model in models {
            let listing: Vec<usize> = (0..self.list.len())
                .filter(|&i| self.list[i].models.iter().any(|m| m == model))
                .collect();
            let serving = if listing.is_empty() {
                (0..self.list.len())
                    .filter(|&i| self.list[i].models.is_empty())
                    .collect()
            } else {
                listing
            };
            for endpoint in serving {
                if !out
                    .iter()
                    .any(|t| t.endpoint == endpoint && t.model == *model)
                {
                    out.push(Target {
                        endpoint,
                        endpoint_name: self.list[endpoint].name.clone(),
                        model: (*model).to_owned(),
                    });
                }
            }
        }
        out
    }
}

impl LlmService for Endpoints {
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        match self.list.get(request.endpoint) {
            Some(e) => e.service.chat(request).await,
            None => Err(LlmError::Connect(format!(
                "no endpoint number {}",
                request.endpoint
            ))),
        }
    }

    async fn chat_streamed(
        &self,
        request: &ChatRequest,
        partial: &tokio::sync::watch::Sender<String>,
    ) -> Result<ChatResponse, LlmError> {
        match self.list.get(request.endpoint) {
            Some(e) => e.service.chat_streamed(request, partial).await,
            None => Err(LlmError::Connect(format!(
                "no endpoint number {}",
                request.endpoint
            ))),
        }
    }

    fn chain(&self, models: &[&str]) -> Vec<Target> {
        Endpoints::chain(self, models)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EndpointConfig;

    fn config(endpoints: &[(&str, &[&str])]) -> LlmConfig {
        use figment::providers::{Format, Toml};
        // The defaults alone: the environment belongs to the config tests' jails.
        let mut llm = figment::Figment::from(Toml::string(crate::config::DEFAULTS))
            .extract::<crate::config::Config>()
            .expect("the defaults load")
            .llm;
        llm.endpoints = endpoints
            .iter()
            .map(|(name, models)| EndpointConfig {
                name: (*name).to_owned(),
                base_url: "http://127.0.0.1:9/v1".into(),
                models: models.iter().map(|m| (*m).to_owned()).collect(),
                ..EndpointConfig::default()
            })
            .collect();
        llm
    }

    fn entries(chain: &[Target]) -> Vec<(&str, &str)> {
        chain
            .iter()
            .map(|t| (&*t.endpoint_name, t.model.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn a_chain_lists_every_endpoint_of_each_model_in_order_and_catch_alls_for_the_rest() {
        let endpoints = Endpoints::from_config(&config(&[
            ("local", &["small"]),
            ("cloud", &["big", "small"]),
            ("any", &[]),
        ]))
        .await
        .expect("endpoints");
        assert_eq!(endpoints.names(), ["local", "cloud", "any"]);
        assert_eq!(
            entries(&endpoints.chain(&["big", "small", "other"])),
            [
                ("cloud", "big"),
                ("local", "small"),
                ("cloud", "small"),
                ("any", "other")
            ]
        );
        assert_eq!(
            entries(&endpoints.chain(&["small", "small"])),
            [("local", "small"), ("cloud", "small")]
        );
        let e = Endpoints::from_config(&config(&[("a", &[]), ("a", &[])]))
            .await
            .expect_err("two named a");
        assert!(e.to_string().contains("two endpoints are named"), "{e}");
    }
}
