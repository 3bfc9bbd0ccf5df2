//! The operator's live map: `GET /map` (the page) and `GET /map/data` (the view as JSON).
//!
//! The page is self-contained: no external script, font or tile; it draws a coordinate
//! grid, and tiles only if the operator gives a tile URL on the page. It asks for
//! `/map/data` once a second with the bearer token typed on the page (or given as
//! `#token=` in the URL), which needs the `reader` role when auth is on: `401` without a
//! known token, `403` without the role, both counted in `locus_auth_refused_total`.
//!
//! `/map/data?min_lat=&min_lon=&max_lat=&max_lon=&cols=&rows=&points_max=&trips_max=`
//! answers every node's part of the view (see `map`): per-cell counts by status, the
//! points while few, live trips with their routes, drivers and ingest rate per node, and
//! the members with their liveness. A bad parameter answers `400` naming it; more than
//! [`MAX_GATHERS`] views being gathered at once answer `429`.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::{Auth, Need, Refused, Role};
use crate::drivers::map::MapQuery;
use crate::geo::LatLonBox;
use crate::map::MapSource;

/// The page.
pub const MAP_HTML: &str = include_str!("map.html");

/// Views gathered at once on one node.
pub const MAX_GATHERS: usize = 4;

/// What the map endpoints need.
pub struct MapHttp {
    pub source: Arc<MapSource>,
    /// `None`: auth is off, the data is open like every other read.
    pub auth: Option<Arc<Auth>>,
    pub gathers: tokio::sync::Semaphore,
}

impl MapHttp {
    pub fn new(source: Arc<MapSource>, auth: Option<Arc<Auth>>) -> Arc<MapHttp> {
        Arc::new(MapHttp { source, auth, gathers: tokio::sync::Semaphore::new(MAX_GATHERS) })
    }
}

fn answer(code: StatusCode, label: &'static str, msg: String) -> Response {
    metrics::counter!("locus_map_requests_total", "code" => label).increment(1);
    (code, [(header::CACHE_CONTROL, "no-store"), (header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg)
        .into_response()
}

pub async fn page() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        MAP_HTML,
    )
        .into_response()
}

/// The view's parameters; absent ones take the defaults (the whole world, a 64 x 40
/// grid, points below 5,000 drivers, up to 200 trips). All are numbers, so the query
/// string needs no decoding: anything else is refused naming the parameter.
#[derive(Debug, Default, PartialEq)]
pub struct Params {
    min_lat: Option<f64>,
    min_lon: Option<f64>,
    max_lat: Option<f64>,
    max_lon: Option<f64>,
    cols: Option<u32>,
    rows: Option<u32>,
    points_max: Option<u32>,
    trips_max: Option<u32>,
}

impl Params {
    pub fn parse(raw: &str) -> Result<Params, (String, String)> {
        let mut p = Params::default();
        for pair in raw.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = |v: &str| v.parse::<f64>().map_err(|_| (k.to_string(), format!("{v:?} is not a number")));
            let int = |v: &str| v.parse::<u32>().map_err(|_| (k.to_string(), format!("{v:?} is not a count")));
            match k {
                "min_lat" => p.min_lat = Some(num(v)?),
                "min_lon" => p.min_lon = Some(num(v)?),
                "max_lat" => p.max_lat = Some(num(v)?),
                "max_lon" => p.max_lon = Some(num(v)?),
                "cols" => p.cols = Some(int(v)?),
                "rows" => p.rows = Some(int(v)?),
                "points_max" => p.points_max = Some(int(v)?),
                "trips_max" => p.trips_max = Some(int(v)?),
                _ => return Err((k.chars().take(32).collect(), "unknown parameter".into())),
            }
        }
        Ok(p)
    }

    fn query(&self) -> Result<MapQuery, (&'static str, String)> {
        let b = LatLonBox {
            min_lat: self.min_lat.unwrap_or(-85.0),
            min_lon: self.min_lon.unwrap_or(-180.0),
            max_lat: self.max_lat.unwrap_or(85.0),
            max_lon: self.max_lon.unwrap_or(180.0),
        };
        MapQuery::new(
            b,
            self.cols.unwrap_or(64),
            self.rows.unwrap_or(40),
            self.points_max.unwrap_or(5_000),
            self.trips_max.unwrap_or(200),
        )
    }
}

pub(crate) async fn data(State(s): State<super::HttpState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let Some(m) = s.map else { return answer(StatusCode::NOT_FOUND, "404", "not found\n".into()) };
    if let Some(auth) = &m.auth
        && let Err((r, name)) = auth.check_role(Role::Reader, crate::auth::layer::bearer(&headers))
    {
        let (code, label, reason, msg) = match r {
            Refused::Unauthenticated(why) => (
                StatusCode::UNAUTHORIZED,
                "401",
                "unauthenticated",
                format!("{why}: send `authorization: Bearer <token>` with a reader token\n"),
            ),
            Refused::PermissionDenied(_) => {
                (StatusCode::FORBIDDEN, "403", "permission_denied", "the token lacks the reader role\n".to_string())
            }
        };
        let need = crate::auth::layer::need_label(Need::Role(Role::Reader));
        metrics::counter!("locus_auth_refused_total", "reason" => reason, "need" => need).increment(1);
        tracing::debug!(path = "/map/data", reason, token_name = name.as_deref().unwrap_or("-"), "request refused");
        return answer(code, label, msg);
    }
    let q = match Params::parse(raw.as_deref().unwrap_or("")) {
        Ok(p) => p.query(),
        Err((field, reason)) => return answer(StatusCode::BAD_REQUEST, "400", format!("{field}: {reason}\n")),
    };
    let q = match q {
        Ok(q) => q,
        Err((field, reason)) => return answer(StatusCode::BAD_REQUEST, "400", format!("{field}: {reason}\n")),
    };
    let Ok(_permit) = m.gathers.try_acquire() else {
        return answer(StatusCode::TOO_MANY_REQUESTS, "429", "too many map views gathered at once; retry\n".into());
    };
    let body = m.source.view_json(&q).await;
    metrics::counter!("locus_map_requests_total", "code" => "200").increment(1);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_and_bad_ones_are_named() {
        let p = Params::parse("min_lat=-1.5&max_lat=2&cols=10").unwrap();
        assert_eq!((p.min_lat, p.max_lat, p.cols, p.rows), (Some(-1.5), Some(2.0), Some(10), None));
        assert_eq!(Params::parse("cols=-3").unwrap_err().0, "cols");
        assert_eq!(Params::parse("min_lon=abc").unwrap_err().0, "min_lon");
        assert_eq!(Params::parse("evil=1").unwrap_err(), ("evil".to_string(), "unknown parameter".to_string()));
        assert!(Params::parse("").unwrap().query().is_ok(), "the defaults make a valid view");
    }
}
