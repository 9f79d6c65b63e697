//! The HTTP layer: routing of Kubernetes API paths, content negotiation (JSON, Table,
//! aggregated discovery), bearer-token authentication, and watch streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::discovery;
use super::error::{ApiError, Result};
use super::events_view;
use super::logs::{self, LogOptions, LogReader, LogSource, Renderer};
use super::paging::{ContinueToken, Scope};
use super::patch::{self, PatchType};
use super::resources::{self as r, ResourceType, Subresource};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{self, Page, PageRequest, Store, Watch, WatchEvent, WatchOptions};
use super::table::{self, IncludeObject};
use super::util;

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest accepted request body, as the real server's default.
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Watch duration when the client gives no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The pod runtime's logs, set after the server starts (the runtime comes later).
pub(crate) type LogSourceSlot = Arc<std::sync::RwLock<Option<Arc<dyn LogSource>>>>;

pub(crate) struct Server {
    pub store: Arc<Store>,
    pub log_source: LogSourceSlot,
    pub token: String,
    pub bookmark_interval: Duration,
    pub shutdown: watch::Receiver<bool>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).expect("JSON values serialize")))
        .expect("valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}

fn text(code: StatusCode, t: &'static str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(t))
        .expect("valid response")
}

/// Parsed query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

/// What a resource URL names.
struct Target<'a> {
    rt: &'static ResourceType,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    sub: Option<Subresource>,
}

fn header_str(h: &HeaderMap, k: header::HeaderName) -> &str {
    h.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// kubectl asks for `application/json;as=Table;v=v1;g=meta.k8s.io,...,application/json`.
fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

// === impl Server ===

impl Server {
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.route(req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        let status = resp.status().as_u16();
        if status >= 500 {
            tracing::warn!(%method, %path, status, "request failed");
        } else {
            tracing::debug!(%method, %path, status, "request");
        }
        resp
    }

    fn authorized(&self, h: &HeaderMap) -> bool {
        let v = header_str(h, header::AUTHORIZATION);
        let Some(t) = v.strip_prefix("Bearer ") else {
            return false;
        };
        // Constant time in the token's length.
        t.len() == self.token.len()
            && t.bytes()
                .zip(self.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>> {
        let path = req.uri().path().to_string();
        let query = Query(util::parse_query(req.uri().query().unwrap_or_default()));
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let get = req.method() == Method::GET;
        match segs.as_slice() {
            ["version"] if get => return Ok(json_response(StatusCode::OK, &discovery::version())),
            ["healthz" | "readyz" | "livez", ..] if get => return Ok(text(StatusCode::OK, "ok")),
            _ => {}
        }
        if !self.authorized(req.headers()) {
            return Err(ApiError::unauthorized());
        }
        let accept = header_str(req.headers(), header::ACCEPT).to_string();
        let discovery_reply = |v: Option<Value>| -> Result<Response<Body>> {
            v.map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| ApiError::path_not_found(&path))
        };
        let types = self.store.resource_types();
        let types = types.as_slice();
        match segs.as_slice() {
            ["api"] | ["apis"] if get => {
                let core = segs[0] == "api";
                if discovery::wants_aggregated(&accept) {
                    let body =
                        serde_json::to_vec(&discovery::aggregated(types, core)).expect("JSON");
                    return Ok(Response::builder()
                        .header(header::CONTENT_TYPE, discovery::AGGREGATED_CONTENT_TYPE)
                        .body(full(body))
                        .expect("valid response"));
                }
                discovery_reply(Some(if core {
                    discovery::api_versions()
                } else {
                    discovery::api_group_list(types)
                }))
            }
            ["api", v] if get => discovery_reply(discovery::resource_list(types, "", v)),
            ["apis", g] if get => discovery_reply(discovery::group(types, g)),
            ["apis", g, v] if get => discovery_reply(discovery::resource_list(types, g, v)),
            ["openapi", "v3"] if get => discovery_reply(Some(discovery::openapi_v3_root(types))),
            ["openapi", "v3", rest @ ..] if get => {
                discovery_reply(discovery::openapi_v3_doc(types, &rest.join("/")))
            }
            ["api", "v1", "namespaces", ns, "pods", name, "log"] if get => {
                self.pod_log(ns, name, &query)
            }
            ["api", v, rest @ ..] => {
                let t = Self::target(types, &path, "", v, rest)?;
                self.resource(req, t, query, &accept).await
            }
            ["apis", g, v, rest @ ..] => {
                let t = Self::target(types, &path, g, v, rest)?;
                self.resource(req, t, query, &accept).await
            }
            _ => Err(ApiError::path_not_found(&path)),
        }
    }

    fn target<'a>(
        types: &[&'static ResourceType],
        path: &str,
        group: &str,
        version: &str,
        rest: &[&'a str],
    ) -> Result<Target<'a>> {
        let not_found = || ApiError::path_not_found(path);
        let (namespace, rest) = match rest {
            // `namespaces/<ns>/status` is the namespace's own subresource.
            ["namespaces", ns, sub @ ..] if !sub.is_empty() && sub != ["status"] => {
                (Some(*ns), sub)
            }
            _ => (None, rest),
        };
        let (resource, name, sub) = match rest {
            [res] => (*res, None, None),
            [res, name] => (*res, Some(*name), None),
            [res, name, sub] => (
                *res,
                Some(*name),
                Some(Subresource::parse(sub).ok_or_else(not_found)?),
            ),
            _ => return Err(not_found()),
        };
        let rt = types
            .iter()
            .copied()
            .find(|t| t.group == group && t.version == version && t.resource == resource)
            .ok_or_else(not_found)?;
        if (namespace.is_some() && !rt.namespaced) || sub.is_some_and(|s| !rt.has_subresource(s)) {
            return Err(not_found());
        }
        Ok(Target {
            rt,
            namespace,
            name,
            sub,
        })
    }

    async fn read_body(req: Request<Incoming>) -> Result<(HeaderMap, Bytes)> {
        let (parts, body) = req.into_parts();
        let bytes = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::too_large(MAX_BODY)
                } else {
                    ApiError::bad_request(format!("reading the request body: {e}"))
                }
            })?
            .to_bytes();
        Ok((parts.headers, bytes))
    }

    /// Body of a create/update: JSON (or YAML); protobuf is refused.
    fn object_body(headers: &HeaderMap, body: &[u8]) -> Result<Value> {
        let ct = header_str(headers, header::CONTENT_TYPE);
        if ct.contains("protobuf") || body.starts_with(b"k8s\0") {
            return Err(ApiError::unsupported_media_type(ct));
        }
        if body.is_empty() {
            return Err(ApiError::bad_request(
                "the request body is empty; expected a JSON object",
            ));
        }
        patch::parse_body(body)
    }

    fn render(&self, t: &Target<'_>, obj: &Value, accept: &str, query: &Query) -> Value {
        let converted;
        let obj = if t.rt.custom.is_some() {
            converted = store::to_version(t.rt, obj);
            &converted
        } else {
            obj
        };
        if wants_table(accept) && t.sub.is_none() {
            table::table(
                t.rt,
                std::slice::from_ref(obj),
                None,
                IncludeObject::parse(query.get("includeObject")),
            )
        } else {
            obj.clone()
        }
    }

    async fn resource(
        &self,
        req: Request<Incoming>,
        t: Target<'_>,
        query: Query,
        accept: &str,
    ) -> Result<Response<Body>> {
        let (rt, ns, sub) = (t.rt, t.namespace, t.sub);
        // Server-side dry run (`kubectl apply --dry-run=server`, `kubectl diff`): writes go to
        // a scratch copy, with the same validation, defaulting and allocation.
        let scratch;
        let store: &Store = match query.get("dryRun") {
            None | Some("") => &self.store,
            Some("All") => {
                scratch = self.store.scratch_copy();
                &scratch
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported dryRun value {other:?}: only \"All\" is supported"
                )));
            }
        };
        // events.k8s.io/v1 Events are stored as core Events.
        let view = std::ptr::eq(rt, &r::EVENTS_V1);
        let srt: &'static ResourceType = if view { &r::EVENTS } else { rt };
        // Custom objects are stored in their storage version and shown in the URL's.
        let out = |v: Value| {
            if view {
                events_view::to_v1(&v)
            } else if rt.custom.is_some() {
                store::to_version(rt, &v)
            } else {
                v
            }
        };
        let input = |v: Value| {
            if view {
                events_view::to_core(&v)
            } else {
                Ok(v)
            }
        };
        let method = req.method().clone();
        match (&method, t.name) {
            (&Method::GET, None) => {
                let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())?;
                let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())?;
                if query.flag("watch") {
                    return self.watch(rt, ns, labels, fields, &query, accept);
                }
                let (page, meta) = list_page(store, srt, ns, &labels, &fields, &query)?;
                let items: Vec<Value> = page.items.into_iter().map(out).collect();
                if wants_table(accept) {
                    let mut tab = table::table(
                        rt,
                        &items,
                        None,
                        IncludeObject::parse(query.get("includeObject")),
                    );
                    tab["metadata"] = meta;
                    return Ok(json_response(StatusCode::OK, &tab));
                }
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "kind": format!("{}List", rt.kind),
                        "apiVersion": rt.api_version(),
                        "metadata": meta,
                        "items": items,
                    }),
                ))
            }
            (&Method::GET, Some(name)) => {
                if query.flag("watch") {
                    let fields = FieldSelector::parse(&format!("metadata.name={name}"))?;
                    return self.watch(rt, ns, LabelSelector::default(), fields, &query, accept);
                }
                let obj = match sub {
                    Some(Subresource::Scale) => store.get_scale(rt, ns, name)?,
                    _ => out(store.get(srt, ns, name)?),
                };
                Ok(json_response(
                    StatusCode::OK,
                    &self.render(&t, &obj, accept, &query),
                ))
            }
            (&Method::POST, None) => {
                let (headers, body) = Self::read_body(req).await?;
                let obj = input(Self::object_body(&headers, &body)?)?;
                let warnings = field_validation(rt, &query, &obj)?;
                let created = out(store.create(srt, ns, obj)?);
                tracing::debug!(resource = rt.resource, namespace = ns.unwrap_or_default(),
                    name = %created["metadata"]["name"].as_str().unwrap_or_default(), "created");
                Ok(with_warnings(
                    json_response(
                        StatusCode::CREATED,
                        &self.render(&t, &created, accept, &query),
                    ),
                    &warnings,
                ))
            }
            (&Method::PUT, Some(name)) => {
                let (headers, body) = Self::read_body(req).await?;
                let obj = input(Self::object_body(&headers, &body)?)?;
                let warnings = field_validation(rt, &query, &obj)?;
                let res = match sub {
                    None => out(store.update(srt, ns, name, obj)?),
                    Some(Subresource::Status) => store.update_status(rt, ns, name, obj)?,
                    Some(Subresource::Scale) => store.update_scale(rt, ns, name, obj)?,
                };
                Ok(with_warnings(
                    json_response(StatusCode::OK, &self.render(&t, &res, accept, &query)),
                    &warnings,
                ))
            }
            (&Method::PATCH, Some(name)) => {
                let (headers, body) = Self::read_body(req).await?;
                let ct = header_str(&headers, header::CONTENT_TYPE);
                let kind = PatchType::from_content_type(ct)
                    .ok_or_else(|| ApiError::unsupported_media_type(ct))?;
                let warnings = if rt.custom.is_some() && kind != PatchType::Json {
                    field_validation(rt, &query, &patch::parse_body(&body)?)?
                } else {
                    Vec::new()
                };
                let existed = kind == PatchType::Apply && store.get(srt, ns, name).is_ok();
                let res = match sub {
                    None if view => out(patch_event_view(store, ns, name, kind, &body)?),
                    None => store.patch(rt, ns, name, kind, &body)?,
                    Some(Subresource::Status) => store.patch_status(rt, ns, name, kind, &body)?,
                    Some(Subresource::Scale) => store.patch_scale(rt, ns, name, kind, &body)?,
                };
                let code = if kind == PatchType::Apply && !existed {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(with_warnings(
                    json_response(code, &self.render(&t, &res, accept, &query)),
                    &warnings,
                ))
            }
            (&Method::DELETE, Some(name)) if sub.is_none() => {
                let (_, body) = Self::read_body(req).await?;
                let opts = if body.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    patch::parse_body(&body)?
                };
                let gone = out(store.delete(srt, ns, name, opts.get("preconditions"))?);
                tracing::debug!(
                    resource = rt.resource,
                    namespace = ns.unwrap_or_default(),
                    name,
                    "deleted"
                );
                Ok(json_response(StatusCode::OK, &gone))
            }
            (&Method::DELETE, None) => {
                let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())?;
                let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())?;
                let gone: Vec<Value> = store
                    .delete_collection(srt, ns, &labels, &fields)?
                    .into_iter()
                    .map(out)
                    .collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "kind": format!("{}List", rt.kind),
                        "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": store.resource_version().to_string()},
                        "items": gone,
                    }),
                ))
            }
            _ => Err(ApiError::method_not_allowed(
                method.as_str(),
                &format!(
                    "{} {}",
                    rt.qualified(),
                    if t.name.is_some() {
                        "objects"
                    } else {
                        "collections"
                    }
                ),
            )),
        }
    }

    /// `GET .../pods/NAME/log`: the container's log, followed until the pod is deleted.
    fn pod_log(&self, ns: &str, name: &str, query: &Query) -> Result<Response<Body>> {
        let pod = self.store.get(&r::PODS, Some(ns), name)?;
        let opts = LogOptions::parse(|k| query.get(k), name)?;
        let container = logs::pick_container(&pod, name, opts.container.as_deref())?;
        if opts.previous {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            )));
        }
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let source = self
            .log_source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let path = source
            .and_then(|s| s.container_log(ns, name, &uid, &container))
            .filter(|p| p.exists())
            .ok_or_else(|| {
                // The real server's answer for a container that has not started (no log yet).
                ApiError::bad_request(format!(
                    "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
                ))
            })?;
        let mut reader = LogReader::new(&path);
        let mut renderer = Renderer::new(&opts);
        let lines = reader.read_lines();
        let first = renderer.render(lines.iter().map(String::as_str), opts.tail_lines);
        let text = |body: Body| {
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CACHE_CONTROL, "no-cache, private")
                .body(body)
                .expect("valid response")
        };
        if !opts.follow || renderer.done() {
            return Ok(text(full(first)));
        }
        let from_rv = pod
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| self.store.resource_version());
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        if !first.is_empty() {
            tx.try_send(Bytes::from(first))
                .expect("a fresh channel has room");
        }
        let span = tracing::debug_span!("log", namespace = ns, pod = name, container);
        tokio::spawn(
            logs::follow(
                self.store.clone(),
                ns.to_string(),
                name.to_string(),
                uid,
                from_rv,
                reader,
                renderer,
                tx,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        Ok(text(StreamBody::new(stream).boxed_unsync()))
    }

    fn watch(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        labels: LabelSelector,
        fields: FieldSelector,
        query: &Query,
        accept: &str,
    ) -> Result<Response<Body>> {
        let rv = match query.get("resourceVersion").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resourceVersion {s:?}: must be an unsigned integer"
                ))
            })?),
        };
        let opts = WatchOptions {
            namespace: ns.map(String::from),
            labels,
            fields,
            resource_version: rv,
            send_initial_events: query.flag("sendInitialEvents"),
        };
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT);
        let bookmarks = query.flag("allowWatchBookmarks");
        let as_table =
            wants_table(accept).then(|| IncludeObject::parse(query.get("includeObject")));
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let view = std::ptr::eq(rt, &r::EVENTS_V1);
        let srt: &'static ResourceType = if view { &r::EVENTS } else { rt };
        let first = self.store.watch(srt, opts);
        let enc = WatchEncoder { rt, view, as_table };
        let params = StreamParams {
            timeout,
            bookmarks,
            bookmark_interval: self.bookmark_interval,
        };
        let span = tracing::debug_span!(
            "watch",
            resource = rt.resource,
            namespace = ns.unwrap_or_default()
        );
        tokio::spawn(pump(first, enc, params, tx, self.shutdown.clone()).instrument(span));
        let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("valid response"))
    }
}

/// Unknown fields of a custom object's body, handled as `fieldValidation` asks: `Strict`
/// refuses the request (400, kube-apiserver's "strict decoding error"), `Warn` (the default)
/// returns one warning per field, `Ignore` nothing. The store prunes them in every case.
fn field_validation(rt: &ResourceType, query: &Query, body: &Value) -> Result<Vec<String>> {
    if rt.custom.is_none() {
        return Ok(Vec::new());
    }
    let mode = query.get("fieldValidation").unwrap_or("Warn");
    if mode == "Ignore" {
        return Ok(Vec::new());
    }
    let unknown: Vec<String> = super::crd::unknown_fields(rt, body)
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if mode == "Strict" && !unknown.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
            unknown.join(", "),
            kind = rt.kind,
            v = rt.version,
        )));
    }
    Ok(unknown)
}

/// Adds `Warning: 299 - "..."` headers, which kubectl prints as `Warning: ...`.
fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let v = format!("299 - {w:?}");
        if let Ok(h) = http::HeaderValue::from_str(&v) {
            resp.headers_mut().append(header::WARNING, h);
        }
    }
    resp
}

/// Reads the page of a list a request asks for (`limit`, `continue`, `resourceVersion`,
/// `resourceVersionMatch`) and its ListMeta (`resourceVersion`, `continue`,
/// `remainingItemCount`), as kube-apiserver pages.
fn list_page(
    store: &Store,
    rt: &'static ResourceType,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
    query: &Query,
) -> Result<(Page, Value)> {
    let limit = match query.get("limit").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let n = s.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("invalid limit {s:?}: must be an integer"))
            })?;
            // As the real server: zero or a negative limit means no limit.
            usize::try_from(n).ok().filter(|n| *n > 0)
        }
    };
    let scope = match ns {
        None if rt.namespaced => Scope::AllNamespaces,
        other => Scope::Namespace(other.unwrap_or_default()),
    };
    let rv_param = query.get("resourceVersion").unwrap_or_default();
    let rv_match = query.get("resourceVersionMatch").unwrap_or_default();
    let page = match query.get("continue").filter(|s| !s.is_empty()) {
        Some(token) => {
            if !rv_param.is_empty() && rv_param != "0" {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            if !rv_match.is_empty() {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            let token = ContinueToken::decode(token, scope)?;
            let req = PageRequest {
                limit,
                after: Some(token.after.clone()),
                at: token.rv,
            };
            match store.list_page(rt, ns, labels, fields, &req) {
                Err(e) if e.code == 410 => {
                    return Err(ApiError::continue_expired(ContinueToken::encode(
                        None,
                        &token.after,
                        scope,
                    )));
                }
                other => other?,
            }
        }
        None => {
            let at = match (rv_param, rv_match) {
                ("" | "0", "Exact") => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch \"Exact\" needs a resourceVersion other than 0",
                    ));
                }
                ("" | "0", _) => None,
                (s, m) => {
                    let rv = s.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "invalid resourceVersion {s:?}: must be an unsigned integer"
                        ))
                    })?;
                    let current = store.resource_version();
                    match m {
                        "Exact" => Some(rv),
                        "" | "NotOlderThan" if rv <= current => None,
                        "" | "NotOlderThan" => {
                            return Err(ApiError::too_large_resource_version(rv, current));
                        }
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "unsupported resourceVersionMatch {other:?}: supported values are \"Exact\" and \"NotOlderThan\""
                            )));
                        }
                    }
                }
            };
            store.list_page(
                rt,
                ns,
                labels,
                fields,
                &PageRequest {
                    limit,
                    after: None,
                    at,
                },
            )?
        }
    };
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(last) = &page.more {
        meta["continue"] = json!(ContinueToken::encode(Some(page.rv), last, scope));
        // Like the real server, only an unfiltered list knows how many items remain.
        if labels.is_empty() && fields.is_empty() {
            meta["remainingItemCount"] = json!(page.remaining);
        }
    }
    Ok((page, meta))
}

/// A patch of an `events.k8s.io/v1` Event: applied to the v1 view of the stored core
/// Event, written back with the read resourceVersion (retried on a concurrent write).
fn patch_event_view(
    store: &Store,
    ns: Option<&str>,
    name: &str,
    kind: PatchType,
    body: &[u8],
) -> Result<Value> {
    for _ in 0..5 {
        let current = match store.get(&r::EVENTS, ns, name) {
            Ok(c) => c,
            Err(e) if e.code == 404 && kind == PatchType::Apply => {
                let mut obj = events_view::to_core(&patch::parse_body(body)?)?;
                obj["metadata"]["name"] = json!(name);
                return store.create(&r::EVENTS, ns, obj);
            }
            Err(e) => return Err(e),
        };
        let view = events_view::to_v1(&current);
        let patched = patch::apply(kind, &view, body)?;
        let rv = |v: &Value| v.pointer("/metadata/resourceVersion").cloned();
        if rv(&patched) != rv(&view) {
            return Err(ApiError::stale(&r::EVENTS_V1, name));
        }
        match store.update(&r::EVENTS, ns, name, events_view::to_core(&patched)?) {
            Err(e) if e.reason == "Conflict" => continue,
            res => return res,
        }
    }
    Err(ApiError::stale(&r::EVENTS_V1, name))
}

/// How a watch stream encodes its events: one JSON object per line.
struct WatchEncoder {
    rt: &'static ResourceType,
    /// events.k8s.io/v1 view of core Events.
    view: bool,
    as_table: Option<IncludeObject>,
}

impl WatchEncoder {
    fn line(ty: &str, object: &Value) -> Bytes {
        let mut line = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("JSON");
        line.push(b'\n');
        Bytes::from(line)
    }

    fn object(&self, ty: &str, obj: &Value) -> Bytes {
        let converted;
        let obj = if self.view {
            converted = events_view::to_v1(obj);
            &converted
        } else if self.rt.custom.is_some() {
            converted = store::to_version(self.rt, obj);
            &converted
        } else {
            obj
        };
        match self.as_table {
            Some(inc) => Self::line(
                ty,
                &table::table(self.rt, std::slice::from_ref(obj), None, inc),
            ),
            None => Self::line(ty, obj),
        }
    }

    /// Bookmarks carry kind and apiVersion: kube-rs refuses them otherwise.
    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj =
            json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta});
        Self::line("BOOKMARK", &obj)
    }

    fn error(&self, e: &ApiError) -> Bytes {
        Self::line("ERROR", &e.to_status())
    }
}

struct StreamParams {
    timeout: Duration,
    bookmarks: bool,
    bookmark_interval: Duration,
}

/// Feeds a watch into a response body until the watch ends, the timeout passes, the client
/// goes away or the server shuts down.
async fn pump(
    first: Result<Watch>,
    enc: WatchEncoder,
    p: StreamParams,
    tx: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut w = match first {
        Ok(w) => w,
        Err(e) => {
            // An expired resourceVersion is an ERROR event inside a 200 stream, which is what
            // makes clients relist (an HTTP 410 makes kube-rs retry the same version forever).
            let _ = tx.send(enc.error(&e)).await;
            return;
        }
    };
    let deadline = tokio::time::sleep(p.timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + p.bookmark_interval,
        p.bookmark_interval,
    );
    loop {
        let line = tokio::select! {
            ev = w.next() => match ev {
                Some(WatchEvent::Added(o)) => enc.object("ADDED", &o),
                Some(WatchEvent::Modified(o)) => enc.object("MODIFIED", &o),
                Some(WatchEvent::Deleted(o)) => enc.object("DELETED", &o),
                Some(WatchEvent::Bookmark { rv, initial_events_end }) => {
                    if !p.bookmarks && !initial_events_end {
                        continue;
                    }
                    enc.bookmark(rv, initial_events_end)
                }
                Some(WatchEvent::Error(e)) => enc.error(&e),
                None => break,
            },
            _ = tick.tick(), if p.bookmarks => match w.bookmark_rv() {
                Some(rv) => enc.bookmark(rv, false),
                None => continue,
            },
            _ = &mut deadline => break,
            _ = tx.closed() => break,
            _ = shutdown.changed() => break,
        };
        if tx.send(line).await.is_err() {
            break;
        }
    }
    tracing::debug!("watch ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_negotiation() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(""));
    }

    #[test]
    fn targets() {
        let t = Server::target(
            r::ALL,
            "/",
            "",
            "v1",
            &["namespaces", "a", "services", "web"],
        )
        .unwrap();
        assert_eq!(
            (t.rt.resource, t.namespace, t.name),
            ("services", Some("a"), Some("web"))
        );
        let t = Server::target(r::ALL, "/", "", "v1", &["namespaces", "a"]).unwrap();
        assert_eq!(
            (t.rt.resource, t.namespace, t.name),
            ("namespaces", None, Some("a"))
        );
        let t = Server::target(r::ALL, "/", "", "v1", &["namespaces", "a", "status"]).unwrap();
        assert_eq!(t.sub, Some(Subresource::Status));
        let t = Server::target(
            r::ALL,
            "/",
            "apps",
            "v1",
            &["namespaces", "a", "deployments", "d", "scale"],
        )
        .unwrap();
        assert_eq!(t.sub, Some(Subresource::Scale));
        assert_eq!(
            Server::target(r::ALL, "/x", "", "v1", &["namespaces", "a", "nodes"])
                .err()
                .unwrap()
                .code,
            404
        );
        assert_eq!(
            Server::target(r::ALL, "/x", "", "v1", &["services", "a", "scale"])
                .err()
                .unwrap()
                .code,
            404
        );
        assert_eq!(
            Server::target(r::ALL, "/x", "", "v1", &["widgets"])
                .err()
                .unwrap()
                .code,
            404
        );
    }
}
