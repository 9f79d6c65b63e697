//! `meshctl ca create` and `meshctl cert issue` (DESIGN.md section 8).
//!
//! Each cluster has its own CA. Leaf certificates carry the caller's identity as a URI SAN:
//! `spiffe://<cluster>.mesh/apiserver` or `spiffe://<cluster>.mesh/agent/<node>`. The CA
//! itself carries `spiffe://<cluster>.mesh` so tools can tell which cluster it belongs to.
//! Private keys are written with mode 0600 and never printed.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use mesh_core::ClusterName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA: writes ca.crt and ca.key into --out-dir.
    Create(CaCreate),
}

#[derive(Args)]
pub struct CaCreate {
    /// Cluster the CA belongs to.
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    cluster: ClusterName,
    /// Directory to write ca.crt and ca.key into (created if missing).
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    days: i64,
    /// Overwrite an existing CA. Every certificate it signed stops being trusted.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Issue a certificate signed by a cluster CA: writes <name>.crt and <name>.key.
    Issue(CertIssue),
}

#[derive(Args)]
pub struct CertIssue {
    /// Directory holding the cluster's ca.crt and ca.key.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Cluster of the certificate; must be the CA's cluster.
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    cluster: ClusterName,
    /// Issue an apiserver certificate (server and client: it also imports peers).
    #[arg(long, conflicts_with_all = ["agent", "operator"], required_unless_present_any = ["agent", "operator"])]
    apiserver: bool,
    /// Issue an agent certificate for this node.
    #[arg(long, value_name = "NODE", conflicts_with = "operator")]
    agent: Option<String>,
    /// Issue an operator certificate (meshctl: reads everything, writes nothing).
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// DNS names to add as SANs (apiserver: the Service names and LoadBalancer hostname).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// IP addresses to add as SANs (apiserver: the LoadBalancer IP).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// Directory to write the certificate and key into.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// File name stem (default: apiserver or agent-<node>).
    #[arg(long)]
    name: Option<String>,
}

pub fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Create(args) => {
            let (crt, key) = create_ca(&args.cluster, &args.out_dir, args.days, args.force)?;
            println!(
                "created CA of cluster {}: {} (key {})",
                args.cluster,
                crt.display(),
                key.display()
            );
            Ok(())
        }
    }
}

pub fn run_cert(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Issue(args) => {
            let (crt, _key) = issue(&args)?;
            println!("issued {} for {}", crt.display(), spiffe_id(&args)?);
            Ok(())
        }
    }
}

/// Creates a CA and writes `ca.crt` and `ca.key` into `dir`.
pub fn create_ca(
    cluster: &ClusterName,
    dir: &Path,
    days: i64,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if days <= 0 {
        bail!("--days must be positive, got {days}");
    }
    let crt = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if !force && (crt.exists() || key_path.exists()) {
        bail!(
            "{} already holds a CA; pass --force to replace it (certificates it signed stop being trusted)",
            dir.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating CA key")?;
    let params = ca_params(cluster, days)?;
    let cert = params.self_signed(&key).context("self-signing CA")?;
    write_file(&crt, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok((crt, key_path))
}

fn ca_params(cluster: &ClusterName, days: i64) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("mesh CA {cluster}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{cluster}.mesh")
            .try_into()
            .context("CA URI SAN")?,
    )];
    set_validity(&mut params, days);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // Tolerate small clock skew between clusters.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days);
}

/// The cluster a CA certificate belongs to, read from its `spiffe://<cluster>.mesh` SAN.
pub fn ca_cluster(ca_pem: &str) -> anyhow::Result<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem.parse_x509().context("parsing CA certificate")?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(c) = uri
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.strip_suffix(".mesh"))
            {
                return Ok(c.to_string());
            }
        }
    }
    bail!(
        "CA certificate has no spiffe://<cluster>.mesh URI SAN: was it made by meshctl ca create?"
    )
}

fn spiffe_id(args: &CertIssue) -> anyhow::Result<String> {
    let check = |flag: &str, name: &str| {
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "invalid name {name:?} for {flag}: use lowercase letters, digits, '-' and '.'"
            ))
        }
    };
    Ok(match (&args.agent, &args.operator) {
        (Some(node), _) => {
            check("--agent", node)?;
            format!("spiffe://{}.mesh/agent/{node}", args.cluster)
        }
        (None, Some(name)) => {
            check("--operator", name)?;
            format!("spiffe://{}.mesh/operator/{name}", args.cluster)
        }
        (None, None) => format!("spiffe://{}.mesh/apiserver", args.cluster),
    })
}

/// The DNS name in an agent's certificate for clients of its Observer API that check a server
/// name (Hubble's `--tls-server-name`).
pub fn hubble_server_name(node: &str, cluster: &str) -> String {
    format!("{node}.{cluster}.hubble-grpc.mesh")
}

/// Issues a leaf certificate as `args` describe; returns the (cert, key) paths.
pub fn issue(args: &CertIssue) -> anyhow::Result<(PathBuf, PathBuf)> {
    if args.days <= 0 {
        bail!("--days must be positive, got {}", args.days);
    }
    let ca_crt = args.ca_dir.join("ca.crt");
    let ca_key = args.ca_dir.join("ca.key");
    let ca_pem =
        fs::read_to_string(&ca_crt).with_context(|| format!("reading {}", ca_crt.display()))?;
    let ca_key_pem =
        fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
    let owner = ca_cluster(&ca_pem).with_context(|| format!("reading {}", ca_crt.display()))?;
    if owner != args.cluster.as_str() {
        bail!(
            "the CA in {} belongs to cluster {owner:?}, not {:?}: a certificate must be signed by its own cluster's CA",
            args.ca_dir.display(),
            args.cluster.as_str()
        );
    }
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).with_context(|| format!("parsing {}", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("loading CA certificate")?;

    let id = spiffe_id(args)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, id.clone());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mesh");
    let mut sans = vec![SanType::URI(id.clone().try_into().context("URI SAN")?)];
    // An agent serves Hubble's Observer API: Hubble's CLI and other grpc clients check one DNS
    // name (`--tls-server-name`), so its certificate names NODE.CLUSTER.hubble-grpc.mesh as
    // Cilium's agents name NODE.CLUSTER.hubble-grpc.cilium.io. mesh's own clients check the
    // SPIFFE identity instead.
    let hubble_name = args
        .agent
        .as_ref()
        .map(|node| hubble_server_name(node, args.cluster.as_str()));
    for d in args.dns.iter().chain(hubble_name.as_ref()) {
        sans.push(SanType::DnsName(
            d.clone()
                .try_into()
                .with_context(|| format!("invalid DNS name {d:?}"))?,
        ));
    }
    sans.extend(args.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Agents serve the Observer API (flows) with their node certificate: server and client.
    params.extended_key_usages = if args.operator.is_some() {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    set_validity(&mut params, args.days);
    let key = KeyPair::generate().context("generating key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing certificate")?;

    let stem = match (&args.name, &args.agent, &args.operator) {
        (Some(n), _, _) => n.clone(),
        (None, Some(node), _) => format!("agent-{node}"),
        (None, None, Some(name)) => format!("operator-{name}"),
        (None, None, None) => "apiserver".into(),
    };
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let crt = args.out_dir.join(format!("{stem}.crt"));
    let key_path = args.out_dir.join(format!("{stem}.key"));
    write_file(&crt, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok((crt, key_path))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    // Write to a temporary file and rename, so a reader never sees half a certificate.
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().ok();
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn args(dir: &Path, cluster: &str, agent: Option<&str>) -> CertIssue {
        CertIssue {
            ca_dir: dir.to_path_buf(),
            cluster: ClusterName::new(cluster).unwrap(),
            apiserver: agent.is_none(),
            agent: agent.map(String::from),
            operator: None,
            dns: vec!["mesh-apiserver.kube-system.svc".into()],
            ips: vec!["192.0.2.10".parse().unwrap()],
            days: 30,
            out_dir: dir.join("out"),
            name: None,
        }
    }

    #[test]
    fn ca_and_leaves_carry_identities() {
        let dir = tempfile::tempdir().unwrap();
        let east = ClusterName::new("east").unwrap();
        create_ca(&east, dir.path(), 10, false).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca_pem = fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        assert_eq!(ca_cluster(&ca_pem).unwrap(), "east");
        // A second create without --force refuses and keeps the CA.
        let err = create_ca(&east, dir.path(), 10, false).unwrap_err();
        assert!(err.to_string().contains("already holds a CA"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.crt")).unwrap(),
            ca_pem
        );

        let (crt, key) = issue(&args(dir.path(), "east", None)).unwrap();
        assert!(fs::metadata(&key).unwrap().permissions().mode() & 0o077 == 0);
        let pem = fs::read_to_string(crt).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("spiffe://east.mesh/apiserver")),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("mesh-apiserver.kube-system.svc")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("c0:00:02:0a")), "{names:?}");
        // Signed by the CA.
        let (_, cap) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
        let ca = cap.parse_x509().unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();

        let (crt, _) = issue(&args(dir.path(), "east", Some("node-1"))).unwrap();
        assert!(crt.ends_with("agent-node-1.crt"));
        let pem = fs::read_to_string(crt).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // An agent's certificate names its Observer server for Hubble's clients.
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names.contains(&"DNSName(node-1.east.hubble-grpc.mesh)".to_string()),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("spiffe://east.mesh/agent/node-1")),
            "{names:?}"
        );
    }

    #[test]
    fn refuses_other_clusters_ca() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(&ClusterName::new("east").unwrap(), dir.path(), 10, false).unwrap();
        let err = issue(&args(dir.path(), "west", None)).unwrap_err();
        assert!(
            err.to_string().contains("belongs to cluster \"east\""),
            "{err}"
        );
    }
}
