//! Validation of what admits a request before its handler: `[[traffic_classes]]`,
//! `limits.max_proxy_in_flight`, `upstreams[].saturation_in_flight`, `[[rate_limits]]` and the
//! route key `rate_limit`.

use crate::proxy::resilience::classes::{DEFAULT_STANDARD_SHED_ORDER, STANDARD};
use crate::proxy::resilience::ratelimit::{KeySpec, Rate};
use std::collections::HashSet;

impl super::Config {
    pub(super) fn validate_admission(&self, f: &mut super::Findings) {
        self.validate_traffic_classes(f);
        self.validate_rate_limits(f);
    }

    /// The distinct `shed_order` levels, the standard class's included: shedding needs two.
    pub(crate) fn shed_levels(&self) -> usize {
        let standard = self
            .traffic_classes
            .iter()
            .find(|c| c.name == STANDARD)
            .map_or(DEFAULT_STANDARD_SHED_ORDER, |c| c.shed_order);
        let mut levels: HashSet<u32> = self
            .traffic_classes
            .iter()
            .filter(|c| c.name != STANDARD)
            .map(|c| c.shed_order)
            .collect();
        levels.insert(standard);
        levels.len()
    }

    fn validate_traffic_classes(&self, f: &mut super::Findings) {
        let mut names = HashSet::new();
        let mut matchers: Vec<(usize, String, &str)> = Vec::new();
        for (i, c) in self.traffic_classes.iter().enumerate() {
            let key = format!("traffic_classes[{i}]");
            if c.name.trim().is_empty() {
                f.error(
                    format!("{key}.name"),
                    "is empty",
                    "give every class a unique name (it is the `class` label of gatehouse_shed_total)",
                );
            } else if !names.insert(c.name.as_str()) {
                f.error(
                    format!("{key}.name"),
                    format!("`{}` is used by an earlier class", c.name),
                    "give every class a unique name",
                );
            }
            if c.name == STANDARD {
                if !c.header.is_empty() || !c.value.is_empty() {
                    f.warning(
                        key.clone(),
                        "`standard` is the class of requests no other class matches, so its header and value are not used",
                        "remove header and value from this entry (its max_in_flight and shed_order apply)",
                    );
                }
                continue;
            }
            match http::HeaderName::from_bytes(c.header.as_bytes()) {
                Err(_) if c.header.is_empty() => f.error(
                    format!("{key}.header"),
                    "is missing",
                    "name the request header that selects this class, e.g. header = \"x-traffic-class\"",
                ),
                Err(_) => f.error(
                    format!("{key}.header"),
                    format!("`{}` is not a valid header name", c.header),
                    "use a header name such as \"x-traffic-class\" (letters, digits and -)",
                ),
                Ok(name) => {
                    let lower = name.as_str().to_string();
                    if let Some((j, _, _)) = matchers.iter().find(|(_, h, v)| *h == lower && *v == c.value) {
                        f.warning(
                            key.clone(),
                            format!(
                                "never matches: traffic_classes[{j}] has the same header and value and is tried first"
                            ),
                            "remove this class or change its value",
                        );
                    }
                    matchers.push((i, lower, c.value.as_str()));
                }
            }
            if c.value.is_empty() {
                f.error(
                    format!("{key}.value"),
                    "is missing or empty",
                    "set the exact header value that selects this class, e.g. value = \"premium\"",
                );
            } else if http::HeaderValue::from_str(&c.value).is_err() {
                f.error(
                    format!("{key}.value"),
                    format!("{:?} cannot be a header value", c.value),
                    "use visible ASCII characters and spaces",
                );
            }
        }
        let proxies = self.routes.iter().any(|r| r.proxy.is_some());
        if !proxies && (!self.traffic_classes.is_empty() || self.limits.max_proxy_in_flight > 0) {
            f.warning(
                if self.traffic_classes.is_empty() {
                    "limits.max_proxy_in_flight"
                } else {
                    "traffic_classes"
                },
                "traffic classes and load shedding apply to proxied requests, and no route has proxy set",
                "remove them, or add a proxy route",
            );
        }
        if self.shed_levels() < 2 {
            for (i, u) in self.upstreams.iter().enumerate() {
                if u.saturation_in_flight > 0 {
                    f.warning(
                        format!("upstreams[{i}].saturation_in_flight"),
                        "has no effect: a saturated upstream sheds every class below the highest shed_order, and all traffic has the same one",
                        "add a [[traffic_classes]] entry with a different shed_order (e.g. premium traffic with shed_order = 2), or remove it",
                    );
                }
            }
        }
    }

    fn validate_rate_limits(&self, f: &mut super::Findings) {
        let mut names = HashSet::new();
        for (i, l) in self.rate_limits.iter().enumerate() {
            let key = format!("rate_limits[{i}]");
            if l.name.trim().is_empty() {
                f.error(
                    format!("{key}.name"),
                    "is empty",
                    "give every rate limit a unique name (routes refer to it; it labels gatehouse_rate_limited_total)",
                );
            } else if !names.insert(l.name.as_str()) {
                f.error(
                    format!("{key}.name"),
                    format!("`{}` is used by an earlier rate limit", l.name),
                    "give every rate limit a unique name",
                );
            }
            if let Err(e) = KeySpec::parse(&l.key) {
                f.error(
                    format!("{key}.key"),
                    e.to_string(),
                    "use key = \"client_ip\" or key = \"header:x-api-key\"",
                );
            }
            if let Err(e) = Rate::parse(&l.rate) {
                f.error(format!("{key}.rate"), e.to_string(), "e.g. rate = \"100/s\"");
            }
            if l.burst == Some(0) {
                f.error(
                    format!("{key}.burst"),
                    "is 0, which would refuse every request",
                    "set at least 1, or leave it out to allow the rate's count at once",
                );
            }
            if !self
                .routes
                .iter()
                .any(|r| r.rate_limit.as_deref() == Some(l.name.as_str()))
            {
                f.warning(
                    key.clone(),
                    format!("no route uses rate limit `{}`", l.name),
                    "add rate_limit = its name to a [[routes]] entry, or remove it",
                );
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let Some(name) = &r.rate_limit else { continue };
            if !self.rate_limits.iter().any(|l| &l.name == name) {
                let known: Vec<String> = self.rate_limits.iter().map(|l| format!("`{}`", l.name)).collect();
                let known = if known.is_empty() {
                    "none is configured".to_string()
                } else {
                    format!("known: {}", known.join(", "))
                };
                f.error(
                    format!("routes[{i}].rate_limit"),
                    format!("no rate limit is named `{name}` ({known})"),
                    "add a [[rate_limits]] table with that name, or use one that exists",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, Severity};

    fn findings(toml: &str) -> Vec<(Severity, String, String)> {
        load_str(toml)
            .unwrap()
            .validate()
            .iter()
            .map(|f| (f.severity, f.key.clone(), f.problem.clone()))
            .collect()
    }

    const BASE: &str = "[[listeners]]\nname = \"w\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"api\"\nservers = [\"127.0.0.1:9000\"]\n";

    #[test]
    fn the_issue_example_is_valid() {
        let f = findings(&format!(
            "{BASE}saturation_in_flight = 100\n[limits]\nmax_proxy_in_flight = 500\n\
             [[traffic_classes]]\nname = \"premium\"\nheader = \"x-traffic-class\"\nvalue = \"premium\"\nmax_in_flight = 0\nshed_order = 2\n\
             [[traffic_classes]]\nname = \"standard\"\nmax_in_flight = 50\n\
             [[routes]]\npath = \"/api\"\nproxy = \"api\"\nrate_limit = \"per-client\"\n\
             [[rate_limits]]\nname = \"per-client\"\nkey = \"client_ip\"\nrate = \"100/s\"\nburst = 200\n"
        ));
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn mistakes_name_their_key() {
        let f = findings(&format!(
            "{BASE}saturation_in_flight = 10\n\
             [[traffic_classes]]\nname = \"a\"\nheader = \"bad header\"\nvalue = \"x\"\n\
             [[traffic_classes]]\nname = \"a\"\nheader = \"x-c\"\nvalue = \"\"\n\
             [[traffic_classes]]\nname = \"b\"\nvalue = \"v\"\n\
             [[routes]]\nproxy = \"api\"\nrate_limit = \"nope\"\n\
             [[rate_limits]]\nname = \"l\"\nkey = \"cookie:x\"\nrate = \"10/d\"\nburst = 0\n\
             [[rate_limits]]\nname = \"l\"\nkey = \"header:\"\nrate = \"1/s\"\n"
        ));
        let errors: Vec<&str> = f
            .iter()
            .filter(|(s, _, _)| *s == Severity::Error)
            .map(|(_, k, _)| k.as_str())
            .collect();
        for k in [
            "traffic_classes[0].header",
            "traffic_classes[1].name",
            "traffic_classes[1].value",
            "traffic_classes[2].header",
            "routes[0].rate_limit",
            "rate_limits[0].key",
            "rate_limits[0].rate",
            "rate_limits[0].burst",
            "rate_limits[1].name",
            "rate_limits[1].key",
        ] {
            assert!(errors.contains(&k), "missing {k} in {errors:?}");
        }
        let unknown = f.iter().find(|(_, k, _)| k == "routes[0].rate_limit").unwrap();
        assert_eq!(unknown.2, "no rate limit is named `nope` (known: `l`, `l`)");
        // Every class has shed_order 1 like standard: saturation cannot shed anything.
        assert!(f
            .iter()
            .any(|(s, k, _)| *s == Severity::Warning && k == "upstreams[0].saturation_in_flight"));
    }

    #[test]
    fn useless_entries_are_warnings() {
        let f = findings(&format!(
            "{BASE}[[routes]]\nproxy = \"api\"\n\
             [[traffic_classes]]\nname = \"standard\"\nheader = \"x\"\nvalue = \"y\"\n\
             [[traffic_classes]]\nname = \"p\"\nheader = \"X-C\"\nvalue = \"p\"\n\
             [[traffic_classes]]\nname = \"q\"\nheader = \"x-c\"\nvalue = \"p\"\n\
             [[rate_limits]]\nname = \"unused\"\nkey = \"client_ip\"\nrate = \"1/s\"\n"
        ));
        assert!(f.iter().all(|(s, _, _)| *s == Severity::Warning), "{f:?}");
        let keys: Vec<&str> = f.iter().map(|(_, k, _)| k.as_str()).collect();
        assert_eq!(keys, ["traffic_classes[0]", "traffic_classes[2]", "rate_limits[0]"]);
    }
}
