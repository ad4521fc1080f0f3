//! Self-tests of the fault-injection tools in `tests/common`: if the proxy did
//! not really cut or stall, or the private cluster did not really restart, the
//! fault tests built on them would prove nothing.

mod common;

use std::time::Duration;

use common::cluster::PrivateCluster;
use common::proxy::TcpProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cluster_restarts_and_proxy_cuts_and_stalls() {
    let pg = PrivateCluster::start(&[]);
    let proxy = TcpProxy::start(&format!("127.0.0.1:{}", pg.port));
    let via_proxy = format!("postgres://postgres@{}/postgres", proxy.host_port());

    let c = common::connect(&via_proxy).await;
    let level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(level, "logical");

    // stall: the query does not complete while stalled, and does after restore
    proxy.stall();
    let q = tokio::spawn(async move {
        let r: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        (r, c)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !q.is_finished(),
        "a stalled proxy must not forward the query"
    );
    proxy.restore();
    let (one, c) = tokio::time::timeout(Duration::from_secs(10), q)
        .await
        .expect("query completes after restore")
        .unwrap();
    assert_eq!(one, 1);

    // cut: the open connection breaks and new ones are refused until restore
    proxy.cut();
    let err = tokio::time::timeout(Duration::from_secs(10), c.query_one("SELECT 1", &[]))
        .await
        .expect("a cut connection fails promptly");
    assert!(err.is_err(), "query over a cut connection must fail");
    assert!(
        tokio_postgres::connect(&via_proxy, tokio_postgres::NoTls)
            .await
            .is_err(),
        "new connections are refused while cut"
    );
    proxy.restore();
    let c = common::connect(&via_proxy).await;

    // restart: the connection dies, the server comes back
    pg.restart();
    assert!(c.query_one("SELECT 1", &[]).await.is_err());
    let c = common::connect(&pg.admin_url()).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[test]
fn private_cluster_takes_settings() {
    let pg = PrivateCluster::start(&[("wal_level", "replica")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::connect(&pg.admin_url()).await;
        let level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
        assert_eq!(level, "replica");
    });
}
