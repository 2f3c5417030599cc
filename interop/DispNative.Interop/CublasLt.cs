using System.Runtime.InteropServices;

namespace DispNative.Interop;

/// <summary>cudaDataType_t values for the storage types the engine uses.</summary>
public enum CudaDataType { R32F = 0, R16F = 2, R16BF = 14 }

/// <summary>Bindings to cuBLASLt (libcublasLt.so.13 / .12): handle, matmul descriptors, heuristics and matmul.</summary>
public static unsafe class CublasLt
{
    private static readonly Lazy<Api> Lazy = new(() => new Api(), LazyThreadSafetyMode.ExecutionAndPublication);
    private static Api A => Lazy.Value;

    internal const int ComputeType32F = 68;          // CUBLAS_COMPUTE_32F
    private const int DescTransA = 3, DescTransB = 4;  // CUBLASLT_MATMUL_DESC_TRANSA / TRANSB
    private const int LayoutBatchCount = 5, LayoutStridedBatchOffset = 6;
    private const int PrefMaxWorkspaceBytes = 1, PrefMinAlignmentA = 5; // A..D alignment attributes are 5..8

    /// <summary>cublasLtMatmulHeuristicResult_t: algo (8 × uint64), workspaceSize, state, wavesCount, reserved[4].</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct HeuristicResult
    {
        public fixed ulong Algo[8];
        public nuint WorkspaceSize;
        public int State;
        public float WavesCount;
        public fixed int Reserved[4];
    }

    private sealed class Api
    {
        public readonly delegate* unmanaged<nint*, int> cublasLtCreate;
        public readonly delegate* unmanaged<nint, int> cublasLtDestroy;
        public readonly delegate* unmanaged<nint*, int, int, int> cublasLtMatmulDescCreate;
        public readonly delegate* unmanaged<nint, int> cublasLtMatmulDescDestroy;
        public readonly delegate* unmanaged<nint, int, void*, nuint, int> cublasLtMatmulDescSetAttribute;
        public readonly delegate* unmanaged<nint*, int, ulong, ulong, long, int> cublasLtMatrixLayoutCreate;
        public readonly delegate* unmanaged<nint, int> cublasLtMatrixLayoutDestroy;
        public readonly delegate* unmanaged<nint, int, void*, nuint, int> cublasLtMatrixLayoutSetAttribute;
        public readonly delegate* unmanaged<nint*, int> cublasLtMatmulPreferenceCreate;
        public readonly delegate* unmanaged<nint, int> cublasLtMatmulPreferenceDestroy;
        public readonly delegate* unmanaged<nint, int, void*, nuint, int> cublasLtMatmulPreferenceSetAttribute;
        public readonly delegate* unmanaged<nint, nint, nint, nint, nint, nint, nint, int, HeuristicResult*, int*, int> cublasLtMatmulAlgoGetHeuristic;
        public readonly delegate* unmanaged<nint, nint, void*, ulong, nint, ulong, nint, void*, ulong, nint, ulong, nint, void*, ulong, nuint, nint, int> cublasLtMatmul;
        public readonly delegate* unmanaged<int, byte*> cublasLtGetStatusName;
        public readonly delegate* unmanaged<int, byte*> cublasLtGetStatusString;
        public readonly delegate* unmanaged<nuint> cublasLtGetVersion;   // null where not exported
        public readonly string LibraryName;

        public Api()
        {
            var lib = NativeLibraryHandle.Load("cublaslt", NativeLibraryHandle.Versioned("cublasLt", "13", "12"));
            LibraryName = lib.Name;
            cublasLtCreate = (delegate* unmanaged<nint*, int>)lib.Export("cublasLtCreate");
            cublasLtDestroy = (delegate* unmanaged<nint, int>)lib.Export("cublasLtDestroy");
            cublasLtMatmulDescCreate = (delegate* unmanaged<nint*, int, int, int>)lib.Export("cublasLtMatmulDescCreate");
            cublasLtMatmulDescDestroy = (delegate* unmanaged<nint, int>)lib.Export("cublasLtMatmulDescDestroy");
            cublasLtMatmulDescSetAttribute = (delegate* unmanaged<nint, int, void*, nuint, int>)lib.Export("cublasLtMatmulDescSetAttribute");
            cublasLtMatrixLayoutCreate = (delegate* unmanaged<nint*, int, ulong, ulong, long, int>)lib.Export("cublasLtMatrixLayoutCreate");
            cublasLtMatrixLayoutDestroy = (delegate* unmanaged<nint, int>)lib.Export("cublasLtMatrixLayoutDestroy");
            cublasLtMatrixLayoutSetAttribute = (delegate* unmanaged<nint, int, void*, nuint, int>)lib.Export("cublasLtMatrixLayoutSetAttribute");
            cublasLtMatmulPreferenceCreate = (delegate* unmanaged<nint*, int>)lib.Export("cublasLtMatmulPreferenceCreate");
            cublasLtMatmulPreferenceDestroy = (delegate* unmanaged<nint, int>)lib.Export("cublasLtMatmulPreferenceDestroy");
            cublasLtMatmulPreferenceSetAttribute = (delegate* unmanaged<nint, int, void*, nuint, int>)lib.Export("cublasLtMatmulPreferenceSetAttribute");
            cublasLtMatmulAlgoGetHeuristic = (delegate* unmanaged<nint, nint, nint, nint, nint, nint, nint, int, HeuristicResult*, int*, int>)lib.Export("cublasLtMatmulAlgoGetHeuristic");
            cublasLtMatmul = (delegate* unmanaged<nint, nint, void*, ulong, nint, ulong, nint, void*, ulong, nint, ulong, nint, void*, ulong, nuint, nint, int>)lib.Export("cublasLtMatmul");
            cublasLtGetStatusName = (delegate* unmanaged<int, byte*>)lib.Export("cublasLtGetStatusName");
            cublasLtGetStatusString = (delegate* unmanaged<int, byte*>)lib.Export("cublasLtGetStatusString");
            cublasLtGetVersion = (delegate* unmanaged<nuint>)lib.TryExport("cublasLtGetVersion");
        }
    }

    public static string LibraryName => A.LibraryName;

    /// <summary>The library's version number (e.g. 130000), 0 where it does not say.</summary>
    public static long Version => A.cublasLtGetVersion != null ? (long)A.cublasLtGetVersion() : 0;

    internal static void Check(int rc, string function)
    {
        if (rc == 0) return;
        string n = Marshal.PtrToStringUTF8((nint)A.cublasLtGetStatusName(rc)) ?? "CUBLAS_STATUS_UNKNOWN";
        string s = Marshal.PtrToStringUTF8((nint)A.cublasLtGetStatusString(rc)) ?? "unknown";
        if (rc == 3) throw new CudaOutOfMemoryException($"{function} failed: {n}: {s}"); // CUBLAS_STATUS_ALLOC_FAILED
        throw new CudaException("cuBLASLt", function, rc, n, s);
    }

    internal static nint Create() { nint h; Check(A.cublasLtCreate(&h), "cublasLtCreate"); return h; }
    internal static int Destroy(nint h) => A.cublasLtDestroy(h);

    /// <summary>One GEMM shape, prepared once: descriptors plus the heuristic's algorithms, best first (up to
    /// <c>candidates</c>; <see cref="Chosen"/> picks the one that runs, the first unless set). Computes the row-major
    /// product D[M,N] = α·A[M,K]·B[N,K]ᵀ + β·C (C = D), the layout of activations times Linear weights, optionally
    /// batched with strides (elements) between the matrices of a batch. Without <c>transposeB</c> B is [K,N] (D = A·B);
    /// with <c>transposeA</c> A is stored [K,M] and read transposed.</summary>
    public sealed class MatmulPlan : IDisposable
    {
        private nint _desc, _a, _b, _c, _pref;
        private HeuristicResult[] _algos = [];
        private int _chosen;

        /// <summary>How many algorithms the heuristic offered (at least one).</summary>
        public int Candidates => _algos.Length;

        /// <summary>Index of the algorithm <see cref="Run"/> uses: 0 (the heuristic's first) unless set.</summary>
        public int Chosen
        {
            get => _chosen;
            set => _chosen = value >= 0 && value < _algos.Length ? value
                : throw new ArgumentOutOfRangeException(nameof(value), $"algorithm {value} of {_algos.Length}");
        }

        /// <summary>The opaque cublasLtMatmulAlgo_t of candidate <paramref name="i"/> as hex: the same text in another
        /// process means the same algorithm (same library and device).</summary>
        public string AlgorithmId(int i)
        {
            var algo = _algos[i];
            return Convert.ToHexString(new ReadOnlySpan<byte>(algo.Algo, 64));
        }

        public MatmulPlan(CublasLtHandle handle, int m, int n, int k, CudaDataType ab, CudaDataType cd,
            long workspaceLimit, int batch = 1, long strideA = 0, long strideB = 0, long strideC = 0, int lda = 0, int ldb = 0, int ldc = 0,
            uint alignmentBytes = 256, bool transposeB = true, bool transposeA = false, int candidates = 1)
        {
            if (candidates < 1) throw new ArgumentOutOfRangeException(nameof(candidates), "at least one algorithm");
            lda = lda == 0 ? (transposeA ? m : k) : lda; ldb = ldb == 0 ? (transposeB ? k : n) : ldb; ldc = ldc == 0 ? n : ldc;
            try
            {
                // Column-major view: Dᵀ[N,M] = op(B)ᵀ · op(A)ᵀ. B row-major [N,K] (D = A·Bᵀ) is column-major [K,N]:
                // transa = T; B row-major [K,N] (D = A·B) is column-major [N,K]: transa = N. A row-major [M,K] is
                // column-major [K,M] = Aᵀ: transb = N; A stored row-major [K,M] is column-major [M,K]: transb = T.
                nint desc; Check(A.cublasLtMatmulDescCreate(&desc, ComputeType32F, (int)CudaDataType.R32F), "cublasLtMatmulDescCreate"); _desc = desc;
                int opA = transposeB ? 1 : 0, opB = transposeA ? 1 : 0;
                Check(A.cublasLtMatmulDescSetAttribute(_desc, DescTransA, &opA, sizeof(int)), "cublasLtMatmulDescSetAttribute(TRANSA)");
                Check(A.cublasLtMatmulDescSetAttribute(_desc, DescTransB, &opB, sizeof(int)), "cublasLtMatmulDescSetAttribute(TRANSB)");
                _a = transposeB ? Layout((int)ab, (ulong)k, (ulong)n, ldb, batch, strideB) : Layout((int)ab, (ulong)n, (ulong)k, ldb, batch, strideB);
                _b = transposeA ? Layout((int)ab, (ulong)m, (ulong)k, lda, batch, strideA) : Layout((int)ab, (ulong)k, (ulong)m, lda, batch, strideA);
                _c = Layout((int)cd, (ulong)n, (ulong)m, ldc, batch, strideC);
                nint pref; Check(A.cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"); _pref = pref;
                ulong ws = (ulong)workspaceLimit;
                Check(A.cublasLtMatmulPreferenceSetAttribute(_pref, PrefMaxWorkspaceBytes, &ws, sizeof(ulong)), "cublasLtMatmulPreferenceSetAttribute");
                // Pointers into the middle of a buffer (a row offset) may be less aligned than the 256 bytes assumed by default.
                for (int attr = PrefMinAlignmentA; attr < PrefMinAlignmentA + 4; attr++)
                    Check(A.cublasLtMatmulPreferenceSetAttribute(_pref, attr, &alignmentBytes, sizeof(uint)), "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
                var results = new HeuristicResult[candidates];
                int found = 0;
                fixed (HeuristicResult* r = results)
                    Check(A.cublasLtMatmulAlgoGetHeuristic(handle.DangerousGetHandle(), _desc, _a, _b, _c, _c, _pref, candidates, r, &found), "cublasLtMatmulAlgoGetHeuristic");
                // A result whose state is not CUBLAS_STATUS_SUCCESS cannot run.
                _algos = results.Take(Math.Min(found, candidates)).Where(r => r.State == 0).ToArray();
                if (_algos.Length == 0)
                    throw new CudaException("cuBLASLt", "cublasLtMatmulAlgoGetHeuristic", 15, "CUBLAS_STATUS_NOT_SUPPORTED",
                        $"no algorithm for M={m} N={n} K={k} {ab}->{cd} batch {batch}");
            }
            catch { Dispose(); throw; }
        }

        private static nint Layout(int type, ulong rows, ulong cols, long ld, int batch, long stride)
        {
            nint l; Check(A.cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld), "cublasLtMatrixLayoutCreate");
            if (batch > 1)
            {
                Check(A.cublasLtMatrixLayoutSetAttribute(l, LayoutBatchCount, &batch, sizeof(int)), "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
                Check(A.cublasLtMatrixLayoutSetAttribute(l, LayoutStridedBatchOffset, &stride, sizeof(long)), "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
            }
            return l;
        }

        /// <summary>Enqueues D = α·A·Bᵀ + β·D (or α·A·B + β·D without transposeB) on <paramref name="stream"/> (device
        /// pointers) with the algorithm <paramref name="candidate"/> (default: <see cref="Chosen"/>).</summary>
        public void Run(CublasLtHandle handle, ulong a, ulong b, ulong d, float alpha, float beta, ulong workspace, long workspaceBytes, nint stream,
            int? candidate = null)
        {
            var algo = _algos[candidate ?? _chosen];
            Check(A.cublasLtMatmul(handle.DangerousGetHandle(), _desc, &alpha, b, _a, a, _b, &beta, d, _c, d, _c,
                algo.Algo, workspace, (nuint)workspaceBytes, stream), "cublasLtMatmul");
        }

        public void Dispose()
        {
            if (_pref != 0) { A.cublasLtMatmulPreferenceDestroy(_pref); _pref = 0; }
            foreach (var l in new[] { _a, _b, _c }) if (l != 0) A.cublasLtMatrixLayoutDestroy(l);
            _a = _b = _c = 0;
            if (_desc != 0) { A.cublasLtMatmulDescDestroy(_desc); _desc = 0; }
        }
    }
}

/// <summary>A cuBLASLt library handle.</summary>
public sealed class CublasLtHandle : SafeHandle
{
    public CublasLtHandle() : base(0, true) => SetHandle(CublasLt.Create());
    public override bool IsInvalid => handle == 0;
    protected override bool ReleaseHandle() => CublasLt.Destroy(handle) == 0;
}
