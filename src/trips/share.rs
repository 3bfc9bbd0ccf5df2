//! Share My Trip: tokens, the table the public endpoint reads, and its rate limiter.
//!
//! A token is 36 lowercase hex digits: the trip's partition (4 digits, so any node can
//! route a request to the trip's owner without a lookup or a scatter) and 128 random bits
//! (32 digits) from the OS-seeded generator, unrelated to the trip id. The owner's trip
//! actor keeps its entry current: the JSON body is rendered when the trip changes, so a
//! `GET` is one map read and a copy of shared bytes. An entry with no body (before
//! PASSENGER_CARRY, or expired) answers 404 exactly like an unknown token.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use rand::Rng;

use crate::keys::{PARTITIONS, key_hash, partition_of};

pub const TOKEN_LEN: usize = 36;

/// A fresh token for a trip.
pub fn new_token(trip_id: &str) -> String {
    let p = partition_of(trip_id.as_bytes());
    let mut r = [0u8; 16];
    rand::rng().fill_bytes(&mut r);
    let mut s = format!("{p:04x}");
    for b in r {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The partition a well-formed token routes by; `None` for anything else.
pub fn token_partition(t: &str) -> Option<usize> {
    if t.len() != TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let p = usize::from_str_radix(&t[..4], 16).ok()?;
    (p < PARTITIONS as usize).then_some(p)
}

#[derive(Clone, Debug)]
pub struct ShareEntry {
    /// The JSON answer while the link may answer; `None` answers 404.
    pub json: Option<Bytes>,
    pub expires_ms: i64,
}

const STRIPES: usize = 16;

/// token → entry, striped so readers of different tokens rarely meet.
pub struct ShareTable {
    stripes: Vec<RwLock<HashMap<Box<str>, ShareEntry>>>,
}

impl Default for ShareTable {
    fn default() -> Self {
        ShareTable { stripes: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect() }
    }
}

impl ShareTable {
    fn stripe(&self, token: &str) -> &RwLock<HashMap<Box<str>, ShareEntry>> {
        &self.stripes[(key_hash(token.as_bytes()) % STRIPES as u64) as usize]
    }

    pub fn set(&self, token: &str, e: ShareEntry) {
        self.stripe(token).write().expect("share lock").insert(token.into(), e);
    }

    pub fn remove(&self, token: &str) {
        self.stripe(token).write().expect("share lock").remove(token);
    }

    /// The body to answer with, if the link answers now.
    pub fn get(&self, token: &str, now_ms: i64) -> Option<Bytes> {
        let m = self.stripe(token).read().expect("share lock");
        let e = m.get(token)?;
        if now_ms >= e.expires_ms {
            return None;
        }
        e.json.clone()
    }
}

/// Token buckets in a fixed table indexed by a hash of the key (client address or
/// token): memory stays bounded however many distinct keys a flood brings; two keys
/// sharing a bucket only share its budget.
pub struct RateLimiter {
    buckets: Vec<Mutex<Bucket>>,
    rate: f64,
    burst: f64,
    epoch: Instant,
    salt: u64,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    tokens: f64,
    at_s: f64,
    used: bool,
}

impl RateLimiter {
    /// `rate` requests per second, bursts of `burst`.
    pub fn new(slots: usize, rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            buckets: (0..slots.max(1)).map(|_| Mutex::new(Bucket::default())).collect(),
            rate,
            burst: burst.max(1.0),
            epoch: Instant::now(),
            salt: rand::rng().next_u64(),
        }
    }

    /// Takes one request from `key`'s budget; false when it is exhausted.
    pub fn allow(&self, key: &[u8]) -> bool {
        let h = key_hash(key) ^ self.salt;
        let i = (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) as usize % self.buckets.len();
        let now = self.epoch.elapsed().as_secs_f64();
        let mut b = self.buckets[i].lock().expect("bucket lock");
        if !b.used {
            *b = Bucket { tokens: self.burst, at_s: now, used: true };
        }
        b.tokens = (b.tokens + (now - b.at_s) * self.rate).min(self.burst);
        b.at_s = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The live page: self-contained (no external scripts, styles or tiles). It polls the
/// JSON every 2 s and draws the route and the car on a canvas, scaled to fit.
pub const VIEW_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Shared trip</title>
<style>
body{font:15px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{padding:12px 16px;background:#1f2937;color:#fff}
#info{padding:8px 16px}
canvas{display:block;width:100%;height:70vh;background:#fff}
.muted{color:#888}
</style></head><body>
<header><b>Shared trip</b> <span id="status" class="muted">loading…</span></header>
<div id="info"></div>
<canvas id="map"></canvas>
<script>
"use strict";
const url = location.pathname.replace(/\/view\/?$/, "");
const cv = document.getElementById("map"), ctx = cv.getContext("2d");
function esc(s){return String(s).replace(/[&<>"']/g,c=>"&#"+c.charCodeAt(0)+";")}
function draw(t){
  const W = cv.width = cv.clientWidth * devicePixelRatio, H = cv.height = cv.clientHeight * devicePixelRatio;
  ctx.clearRect(0,0,W,H);
  const pts = (t.route||[]).map(p=>[p.lat,p.lon]);
  if (t.driver) pts.push([t.driver.lat,t.driver.lon]);
  if (t.dropoff) pts.push([t.dropoff.lat,t.dropoff.lon]);
  if (!pts.length) return;
  let a=Math.min(...pts.map(p=>p[0])), b=Math.max(...pts.map(p=>p[0]));
  let c=Math.min(...pts.map(p=>p[1])), d=Math.max(...pts.map(p=>p[1]));
  const k=Math.cos((a+b)/2*Math.PI/180), pad=30*devicePixelRatio;
  const s=Math.min((W-2*pad)/Math.max((d-c)*k,1e-5),(H-2*pad)/Math.max(b-a,1e-5));
  const xy=p=>[pad+(p[1]-c)*k*s, H-pad-(p[0]-a)*s];
  ctx.lineWidth=4*devicePixelRatio; ctx.strokeStyle="#2563eb"; ctx.beginPath();
  (t.route||[]).forEach((p,i)=>{const [x,y]=xy([p.lat,p.lon]); i?ctx.lineTo(x,y):ctx.moveTo(x,y)}); ctx.stroke();
  if (t.dropoff){const [x,y]=xy([t.dropoff.lat,t.dropoff.lon]); ctx.fillStyle="#16a34a"; ctx.fillRect(x-6,y-6,12,12);}
  if (t.driver){const [x,y]=xy([t.driver.lat,t.driver.lon]); ctx.fillStyle="#dc2626"; ctx.beginPath(); ctx.arc(x,y,9*devicePixelRatio,0,7); ctx.fill();}
}
async function tick(){
  try {
    const r = await fetch(url, {cache:"no-store"});
    if (r.status === 200) {
      const t = await r.json(), v = t.vehicle||{};
      document.getElementById("status").textContent = t.status.replace(/_/g," ").toLowerCase();
      document.getElementById("info").innerHTML =
        esc(v.colour)+" "+esc(v.model)+" · <b>"+esc(v.plate)+"</b> · cab "+esc(v.cab_number)+
        " · "+(t.distance_m/1000).toFixed(2)+" km";
      draw(t);
    } else if (r.status === 404) {
      document.getElementById("status").textContent = "this link is not active";
    }
  } catch (e) {}
  setTimeout(tick, 2000);
}
tick();
</script></body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_route_by_partition_and_are_random() {
        let a = new_token("trip-1");
        let b = new_token("trip-1");
        assert_ne!(a, b, "not derived from the trip id");
        assert_eq!(a.len(), TOKEN_LEN);
        assert_eq!(token_partition(&a), Some(partition_of(b"trip-1") as usize));
        assert_eq!(token_partition("zz"), None);
        assert_eq!(token_partition(&a.to_uppercase()), None);
        assert_eq!(token_partition(&format!("ffff{}", &a[4..])), None, "partition out of range");
    }

    #[test]
    fn limiter_allows_a_burst_then_refuses() {
        let l = RateLimiter::new(1024, 1.0, 5.0);
        let ok = (0..10).filter(|_| l.allow(b"1.2.3.4")).count();
        assert_eq!(ok, 5);
        assert!(l.allow(b"5.6.7.8"), "another key has its own budget");
    }

    #[test]
    fn table_answers_only_until_expiry() {
        let t = ShareTable::default();
        t.set("k", ShareEntry { json: Some(Bytes::from_static(b"{}")), expires_ms: 100 });
        assert!(t.get("k", 99).is_some());
        assert!(t.get("k", 100).is_none());
        t.set("k", ShareEntry { json: None, expires_ms: 1000 });
        assert!(t.get("k", 1).is_none());
    }
}
