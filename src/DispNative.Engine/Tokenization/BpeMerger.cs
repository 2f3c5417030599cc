namespace DispNative.Engine.Tokenization;

/// <summary>Applies ranked BPE merges to a symbol sequence: always the lowest-rank pair first, the leftmost
/// among equal ranks (the Hugging Face tokenizers order), in O(n log n) with a heap over a linked list.</summary>
internal sealed class BpeMerger
{
    /// <summary>Looks up the merge of two adjacent symbols: its rank (lower merges first) and the merged symbol.</summary>
    public delegate bool MergeLookup(int left, int right, out (int Rank, int NewId) merge);

    private readonly MergeLookup _lookup;

    public BpeMerger(MergeLookup lookup) => _lookup = lookup;

    public BpeMerger(Dictionary<long, (int Rank, int NewId)> merges)
        : this((int a, int b, out (int Rank, int NewId) m) => merges.TryGetValue(Key(a, b), out m)) { }

    public static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    public void Merge(List<int> ids)
    {
        int n = ids.Count;
        if (n < 2) return;
        var sym = ids.ToArray();
        var next = new int[n];
        var prev = new int[n];
        var alive = new bool[n];
        for (int i = 0; i < n; i++) { next[i] = i + 1 < n ? i + 1 : -1; prev[i] = i - 1; alive[i] = true; }
        var heap = new PriorityQueue<(int Pos, int NewId), long>();
        void Push(int pos)
        {
            int nx = next[pos];
            if (nx >= 0 && _lookup(sym[pos], sym[nx], out var m))
                heap.Enqueue((pos, m.NewId), ((long)m.Rank << 32) | (uint)pos);
        }
        for (int i = 0; i + 1 < n; i++) Push(i);
        while (heap.TryDequeue(out var top, out _))
        {
            int pos = top.Pos;
            if (!alive[pos]) continue;
            int right = next[pos];
            if (right < 0) continue;
            if (!_lookup(sym[pos], sym[right], out var m) || m.NewId != top.NewId) continue;
            sym[pos] = m.NewId;
            alive[right] = false;
            next[pos] = next[right];
            if (next[right] >= 0) prev[next[right]] = pos;
            if (prev[pos] >= 0) Push(prev[pos]);
            Push(pos);
        }
        ids.Clear();
        for (int i = 0; i >= 0; i = next[i]) ids.Add(sym[i]);
    }
}
