"""Hash tables from k-means over a trained model's input embeddings (Roller et al. 2021, Sec. 4).

Reads the input embedding matrix (V x D, ``decoder.embed_tokens.weight``) of a fairseq
checkpoint, typically a dense baseline trained on the same dictionary, runs k-means
(scikit-learn) and writes the table file ``--hash-table`` reads (``--hash-type
clustered|dispersed``):

* clustered: k-means with E clusters; token v goes to expert = its cluster.
* dispersed: k-means with C clusters (``--clusters``, default E); every cluster is spread
  evenly over the experts: the members of all clusters, cluster by cluster (members in
  decreasing frequency when ``--dict`` gives dict.txt counts, else in token-id order), are
  dealt round-robin to experts 0, 1, ..., E-1, 0, ... so each cluster puts within one token
  of |cluster|/E tokens on every expert (and every expert gets V/E tokens, +-1).

``--multi N`` writes N columns (one per MultiHash hash function) from k-means runs with
seeds seed, seed+1, ...; dispersed columns also shift the round-robin start.

Example:
  python -m moe_plugin.tools.hash_kmeans CKPT --experts 8 --type clustered --out clustered.txt
  fairseq-train DATA --user-dir moe_plugin --arch hash_lm --hash-type clustered \\
      --hash-table clustered.txt --moe-expert-count 8 ...
"""

import argparse

import numpy as np



def load_embeddings(path: str, key: str = "") -> np.ndarray:
    """(V, D) float64 input embeddings from a fairseq checkpoint (or a plain state dict)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    model = state.get("model", state) if isinstance(state, dict) else state
    if key:
        if key not in model:
            raise SystemExit(f"--key: {key!r} is not in {path}; keys: {', '.join(sorted(model)[:20])} ...")
        return model[key].double().numpy()
    for k in ("decoder.embed_tokens.weight",) + tuple(sorted(k for k in model if k.endswith("embed_tokens.weight"))):
        if k in model:
            return model[k].double().numpy()
    raise SystemExit(f"{path}: no input embedding (decoder.embed_tokens.weight); pass --key")


def read_dict_counts(path: str, num_tokens: int, nspecial: int = 4) -> np.ndarray:
    """Counts in fairseq dictionary order from dict.txt (special symbols first, count 0)."""
    counts = np.zeros(num_tokens, dtype=np.float64)
    with open(path) as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").rsplit(" ", 2)
            idx = nspecial + i
            if idx < num_tokens and len(parts) >= 2:
                try:
                    counts[idx] = float(parts[1])
                except ValueError:
                    pass
    return counts


def kmeans_labels(emb_VD: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if k > emb_VD.shape[0]:
        raise SystemExit(f"--clusters/--experts: {k} clusters for only {emb_VD.shape[0]} tokens")
    return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(emb_VD).astype(np.int64)


def clustered_column(labels_V: np.ndarray) -> np.ndarray:
    """Clustered hash: expert = cluster (k-means was run with E clusters)."""
    return labels_V.copy()


def dispersed_column(labels_V: np.ndarray, num_experts: int, counts_V=None, start: int = 0) -> np.ndarray:
    """Dispersed hash: deal the members of each cluster round-robin over the experts."""
    V = labels_V.shape[0]
    ids = np.arange(V)
    # cluster by cluster; inside a cluster by decreasing count (ties / no counts: token id)
    freq = np.zeros(V) if counts_V is None else np.asarray(counts_V, dtype=np.float64)
    order = np.lexsort((ids, -freq, labels_V))
    table = np.empty(V, dtype=np.int64)
    table[order] = (start + np.arange(V)) % num_experts
    return table


def build_table(emb_VD, kind, num_experts, clusters, multi, seed, n_init, counts_V=None) -> np.ndarray:
    cols = []
    for i in range(multi):
        if kind == "clustered":
            cols.append(clustered_column(kmeans_labels(emb_VD, num_experts, seed + i, n_init)))
        else:
            labels = kmeans_labels(emb_VD, clusters or num_experts, seed + i, n_init)
            cols.append(dispersed_column(labels, num_experts, counts_V, start=i))
    return np.stack(cols, axis=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint whose input embeddings are clustered")
    p.add_argument("--experts", type=int, required=True, help="E, the --moe-expert-count of the hash model")
    p.add_argument("--type", choices=("clustered", "dispersed"), required=True)
    p.add_argument("--out", required=True, help="table file to write (for --hash-table)")
    p.add_argument("--clusters", type=int, default=0, help="dispersed: number of k-means clusters (default E)")
    p.add_argument("--multi", type=int, default=1, help="columns, one per MultiHash hash function (--hash-multi)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (column i uses seed+i)")
    p.add_argument("--n-init", type=int, default=4, help="k-means restarts")
    p.add_argument("--dict", default="", help="dispersed: dict.txt, to deal cluster members by frequency")
    p.add_argument("--key", default="", help="state-dict key of the embedding (default decoder.embed_tokens.weight)")
    args = p.parse_args(argv)
    if args.experts < 1 or args.multi < 1 or args.clusters < 0:
        raise SystemExit("--experts and --multi must be >= 1, --clusters >= 0")
    if args.type == "clustered" and args.clusters not in (0, args.experts):
        raise SystemExit(f"--clusters: {args.clusters}; clustered uses one cluster per expert (E={args.experts})")

    emb = load_embeddings(args.checkpoint, args.key)
    counts = read_dict_counts(args.dict, emb.shape[0]) if args.dict else None
    table = build_table(emb, args.type, args.experts, args.clusters, args.multi, args.seed, args.n_init, counts)

    import torch

    from moe_plugin.routing.hashed import write_table_file

    header = (
        f"moe_plugin hash table: type={args.type} experts={args.experts} "
        f"clusters={args.clusters or args.experts} multi={args.multi} seed={args.seed}\n"
        f"k-means over {args.checkpoint} input embeddings ({emb.shape[0]} x {emb.shape[1]})"
    )
    write_table_file(args.out, torch.from_numpy(table), header)
    loads = np.bincount(table[:, 0], minlength=args.experts)
    print(f"[hash_kmeans] wrote {args.out}: {table.shape[0]} tokens x {table.shape[1]} hash(es); "
          f"tokens per expert (hash 0): min {loads.min()} max {loads.max()}")


if __name__ == "__main__":
    main()
