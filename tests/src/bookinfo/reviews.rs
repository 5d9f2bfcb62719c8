//! Bookinfo's `reviews` service, in Rust (`pod-app reviews`): the other
//! language of the test bed's Bookinfo (productpage, details and ratings
//! are Python, `tests/assets/bookinfo/bookinfo.py`).
//!
//! `GET /reviews/<id>` answers Istio's Bookinfo JSON: two reviews, and for
//! v2 (black stars) and v3 (red stars) each review's rating, fetched from
//! ratings with the request's trace and user headers forwarded
//! ([`crate::httpapp::FORWARDED`]). When ratings fails or does not answer
//! within [`RATINGS_TIMEOUT`] (as Istio's reviews), each rating says
//! "Ratings service is currently unavailable" and the page is still 200.
//! v1 never calls ratings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};

/// How long reviews waits for ratings (Istio's reviews: 10 s).
pub const RATINGS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a rating says when ratings failed.
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// The two reviews of the book, and their stars.
const REVIEWS: [(&str, &str, u64); 2] = [
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!", 5),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
        4,
    ),
];

/// One running reviews version.
#[derive(Debug, Clone)]
pub struct Reviews {
    /// The pod's name (`x-served-by`, `podname`).
    pub name: String,
    /// `v1`, `v2` or `v3`.
    pub version: String,
    /// Ratings' address (its Service), for v2 and v3.
    pub ratings: Option<SocketAddr>,
}

impl Reviews {
    /// The star colour of this version, `None` for v1 (no stars).
    fn color(&self) -> Option<&'static str> {
        match self.version.as_str() {
            "v2" => Some("black"),
            "v3" => Some("red"),
            _ => None,
        }
    }
}

/// Serves until the process is killed.
pub async fn serve(listen: SocketAddr, app: Reviews) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("bookinfo reviews {} ({}) listening on {listen}", app.version, app.name);
    let app = Arc::new(app);
    loop {
        let (tcp, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &app).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn json_response(status: StatusCode, name: &str, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-served-by", name)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

async fn answer(req: &Request<Incoming>, app: &Reviews) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/health" {
        return json_response(StatusCode::OK, &app.name, &json!({"status": "Reviews is healthy"}));
    }
    let Some(id) = path.strip_prefix("/reviews/") else {
        return json_response(StatusCode::NOT_FOUND, &app.name, &json!({"error": format!("no such page: {path}")}));
    };
    let ratings = match (app.color(), app.ratings) {
        (Some(_), Some(addr)) => Some(ratings(addr, id, req.headers()).await),
        _ => None,
    };
    let reviews: Vec<Value> = REVIEWS
        .iter()
        .map(|(reviewer, text, default_stars)| {
            let mut review = json!({"reviewer": reviewer, "text": text});
            if let (Some(color), Some(got)) = (app.color(), &ratings) {
                review["rating"] = match got {
                    Ok(r) => {
                        json!({"stars": r["ratings"][reviewer].as_u64().unwrap_or(*default_stars), "color": color})
                    }
                    Err(_) => json!({"error": RATINGS_UNAVAILABLE}),
                };
            }
            review
        })
        .collect();
    let mut body = json!({"id": id, "podname": app.name, "version": app.version, "reviews": reviews});
    if let Some(Err(why)) = &ratings {
        body["ratings_error"] = json!(why);
    }
    json_response(StatusCode::OK, &app.name, &body)
}

/// `GET http://<ratings>/ratings/<id>` with the forwarded headers.
async fn ratings(addr: SocketAddr, id: &str, incoming: &hyper::HeaderMap) -> Result<Value, String> {
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::get(format!("/ratings/{id}")).header(header::HOST, "ratings:9080");
        for h in crate::httpapp::FORWARDED {
            for v in incoming.get_all(h) {
                req = req.header(h, v);
            }
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::new())).expect("valid request parts"))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() {
            return Err(format!("ratings answered {status}"));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("ratings' body: {e}"))
    };
    tokio::time::timeout(RATINGS_TIMEOUT, fetch).await.unwrap_or_else(|_| Err("ratings timed out".into()))
}
