//! Outbound relay benchmark: the real server (release build, `$POSTERN_BIN`) relays to a sink
//! found through a test DNS server. Prints the time from the 250 reply to the sink's acceptance
//! for single messages, and the rate at which a queue of messages is relayed at C=10.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::sink::{loopback_ip, Sink, SinkScript};
use postern_e2e::{set_key, SmtpClient, TestServer};

#[derive(Parser)]
struct Args {
    /// Messages relayed in the throughput run.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Outbound connections to the sink's domain (and client connections submitting).
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Single messages timed for the latency figure.
    #[arg(long, default_value_t = 50)]
    samples: usize,
}

fn message(n: usize) -> Vec<u8> {
    let mut m =
        format!("From: load@example.test\r\nTo: sink@sink.test\r\nSubject: relay {n}\r\n\r\n")
            .into_bytes();
    while m.len() < 1024 {
        m.extend_from_slice(
            b"0123456789 relay benchmark body line, about one kilobyte all told\r\n",
        );
    }
    m
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ip = loopback_ip();
    let sink = Sink::start(ip, 0, SinkScript::default()).await;
    let dns = TestDns::start(vec![("sink.test", Rr::A(ip))]);
    let port = sink.addr.port();
    let c = args.concurrency;
    let server = TestServer::start(|config| {
        let config = config.replace(
            "nameservers = [\"127.0.0.1:9\"]",
            &format!("nameservers = [\"{}\"]", dns.addr),
        );
        let config = set_key(&config, "server", "log", "\"warn\"");
        let config = set_key(&config, "relay", "trusted_networks", "[\"127.0.0.0/8\"]");
        let config = set_key(&config, "outbound", "mx_port", &port.to_string());
        set_key(
            &config,
            "outbound",
            "max_connections_per_domain",
            &c.to_string(),
        )
    })?;
    let smtp = server.port("smtp");

    // Latency: one message at a time, from the 250 to the sink's acceptance.
    let (mut client, _) = SmtpClient::connect(smtp).await?;
    client.expect("EHLO bench.test", 250).await?;
    let mut latencies = Vec::with_capacity(args.samples);
    for n in 0..args.samples {
        let before = sink.messages().len();
        client
            .send_mail("load@example.test", &["sink@sink.test"], &message(n))
            .await?;
        let acked = Instant::now();
        while sink.messages().len() <= before {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push(acked.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "250 -> remote acceptance, {} single messages: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        args.samples,
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 9 / 10]),
        ms(*latencies.last().unwrap())
    );

    // Throughput: C clients submit, the relay drains to the sink over C connections.
    let base = sink.messages().len();
    let started = Instant::now();
    let per_client = args.messages / c;
    let mut tasks = Vec::new();
    for k in 0..c {
        tasks.push(tokio::spawn(async move {
            let (mut client, _) = SmtpClient::connect(smtp).await?;
            client.expect("EHLO bench.test", 250).await?;
            for n in 0..per_client {
                client
                    .send_mail(
                        "load@example.test",
                        &["sink@sink.test"],
                        &message(k * per_client + n),
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let accepted = started.elapsed();
    let total = per_client * c;
    let sink = Arc::new(sink);
    while sink.messages().len() < base + total {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relayed = started.elapsed();
    println!(
        "queue of {total} x 1 KB at C={c}: accepted in {:.2} s ({:.0} msg/s), all relayed to the sink in {:.2} s ({:.0} msg/s end to end)",
        accepted.as_secs_f64(),
        total as f64 / accepted.as_secs_f64(),
        relayed.as_secs_f64(),
        total as f64 / relayed.as_secs_f64()
    );
    Ok(())
}
